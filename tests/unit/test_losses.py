"""Every loss of DESIGN §2 against hand-worked numbers and against a direct per-group re-implementation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rao_megatron.losses import LOSSES, SequenceStats, get_loss

T = torch.tensor


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def stats(**kw) -> SequenceStats:
    kw = {k: (T(v, dtype=torch.float64) if isinstance(v, list) and k not in ("group_ids", "is_reference_answer")
              else v) for k, v in kw.items()}
    kw["group_ids"] = T(kw["group_ids"], dtype=torch.int64)
    if "is_reference_answer" in kw:
        kw["is_reference_answer"] = T(kw["is_reference_answer"], dtype=torch.bool)
    return SequenceStats(**kw)


# ---------------------------------------------------------------------------------------------
# Hand-worked batches (values chosen so each step is easy to follow on paper)
# ---------------------------------------------------------------------------------------------

def test_rao_hand_computed():
    # one group, K = 2, β = 0.5, z0 = 1 (log Z0 = 0)
    # Δ_R = [(-1)-(-2), (-3)-(-2)] = [1, -1];  Δ_P = -1 - (-1.5) = 0.5;  log Z = 0.5
    # r̂ = 0.5·Δ_R + 0.5·0.5 = [0.75, -0.25];  r = [1, 0];  residuals [0.25, 0.25]
    s = stats(policy_logps=[-1.0, -3.0], ref_logps=[-2.0, -2.0], policy_prompt_logps=[-1.0, -1.0],
              ref_prompt_logps=[-1.5, -1.5], lengths=[2, 3], rewards=[1.0, 0.0], group_ids=[7, 7])
    loss, m = get_loss("rao")(s, beta=0.5, z0=1.0)
    assert loss.item() == pytest.approx(0.0625)
    assert m["rewards/best"] == pytest.approx(0.75)
    assert m["rewards/worst"] == pytest.approx(-0.25)
    assert m["rewards/gap"] == pytest.approx(1.0)
    assert m["log_z"] == pytest.approx(0.5)
    assert m["residual"] == pytest.approx(0.25)
    assert m["ranking_accuracy"] == 1.0
    assert m["displacement"] == 0.0


def test_rao_two_groups_scale_shift_and_displacement():
    # group A: K = 1, group B: K = 3; β = 1, log_z0 = 2; reward r' = 2·r − 1
    # A: Δ_R = 0.5, Δ_P = 0 -> r̂ = 0.5 + 2 = 2.5; r' = 2·1 − 1 = 1; sq = 2.25
    # B: Δ_R = [-0.5, 0, 1], Δ_P = -1 -> log Z = 1, r̂ = [0.5, 1, 2]; r' = [3, -1, 1]
    #    residuals [2.5, -2, -1] -> mean sq (6.25 + 4 + 1)/3 = 3.75
    # loss = (2.25 + 3.75)/2 = 3.0.  Best of B (r' = 3) has Δ_R = -0.5 < 0 -> displaced (1 of 2 groups).
    s = stats(policy_logps=[-1.0, -2.5, -2.0, -1.0], ref_logps=[-1.5, -2.0, -2.0, -2.0],
              policy_prompt_logps=[0.0, -4.0, -4.0, -4.0], ref_prompt_logps=[0.0, -3.0, -3.0, -3.0],
              lengths=[1, 1, 1, 1], rewards=[1.0, 2.0, 0.0, 1.0], group_ids=[0, 1, 1, 1])
    loss, m = get_loss("rao")(s, beta=1.0, log_z0=2.0, reward_scale=2.0, reward_shift=-1.0)
    assert loss.item() == pytest.approx(3.0)
    # A has one response: no best or worst there; it is a tied group (share 1/2, its Δ_R = 0.5)
    assert m["tied_share"] == pytest.approx(0.5) and m["tied/delta_r"] == pytest.approx(0.5)
    assert m["displacement"] == pytest.approx(1.0)  # B's best (r' = 3) has Δ_R = -0.5 < 0
    # pairs in B by r': (0.5 vs 1: wrong), (0.5 vs 2: wrong), (2 vs 1: right) -> 1/3
    assert m["ranking_accuracy"] == pytest.approx(1 / 3)
    assert m["rewards/best"] == pytest.approx(0.5)  # B's best: r̂ = 0.5
    assert m["rewards/worst"] == pytest.approx(1.0)  # B's worst (r' = -1): r̂ = 1


def test_rao_without_prefix_consistency_uses_the_constant_log_z0():
    # the groups of the test above, log Z = log_z0 = 2 for both (B's Δ_P = -1 left out)
    # A: r̂ = 0.5 + 2 = 2.5, r' = 1 -> sq 2.25
    # B: r̂ = [-0.5, 0, 1] + 2 = [1.5, 2, 3]; r' = [3, -1, 1]; residuals [1.5, -3, -2] -> (2.25 + 9 + 4)/3
    # loss = (2.25 + 15.25/3)/2
    from rao_megatron.config import load_config

    kw = dict(policy_logps=[-1.0, -2.5, -2.0, -1.0], ref_logps=[-1.5, -2.0, -2.0, -2.0], lengths=[1, 1, 1, 1],
              rewards=[1.0, 2.0, 0.0, 1.0], group_ids=[0, 1, 1, 1], ref_prompt_logps=[0.0, -3.0, -3.0, -3.0])
    s = stats(policy_prompt_logps=[0.0, -4.0, -4.0, -4.0], **kw)
    loss, m = get_loss("rao")(s, beta=1.0, log_z0=2.0, reward_scale=2.0, reward_shift=-1.0, prefix_consistency=False)
    assert loss.item() == pytest.approx((2.25 + 15.25 / 3) / 2)
    assert m["log_z"] == pytest.approx(2.0)
    # the prompt's log-probs no longer matter; with prefix consistency they do (the test above: 3.0)
    moved = stats(policy_prompt_logps=[5.0, 1.0, 1.0, 1.0], **kw)
    assert get_loss("rao")(moved, beta=1.0, log_z0=2.0, reward_scale=2.0, reward_shift=-1.0,
                           prefix_consistency=False)[0].item() == pytest.approx(loss.item())
    # the setting reaches the loss from the config
    cfg = load_config(None, ["loss.name=rao", "loss.beta=1.0", "loss.log_z0=2.0", "loss.reward_scale=2.0",
                             "loss.reward_shift=-1.0", "loss.reward_normalization=none",
                             "loss.prefix_consistency=false"])
    assert cfg.loss.build()(s)[0].item() == pytest.approx(loss.item())
    cfg = load_config(None, ["loss.name=rao", "loss.beta=1.0", "loss.log_z0=2.0", "loss.reward_scale=2.0",
                             "loss.reward_shift=-1.0", "loss.reward_normalization=none"])
    assert cfg.loss.build()(s)[0].item() == pytest.approx(3.0)


def test_rao_log_z_modes_hand_computed():
    # the groups of test_rao_two_groups_scale_shift_and_displacement: β = 1, r' = 2r − 1, log_z0 = 2
    # A: r' = [1]            -> sampled log Z = 1 (one response)
    # B: r' = [3, -1, 1]     -> sampled log Z = log((e^3 + e^-1 + e^1)/3)
    # Δ_P: A 0, B -1;  Δ_R: A [0.5], B [-0.5, 0, 1]
    from rao_megatron.config import ConfigError, load_config

    s = stats(policy_logps=[-1.0, -2.5, -2.0, -1.0], ref_logps=[-1.5, -2.0, -2.0, -2.0],
              policy_prompt_logps=[0.0, -4.0, -4.0, -4.0], ref_prompt_logps=[0.0, -3.0, -3.0, -3.0],
              lengths=[1, 1, 1, 1], rewards=[1.0, 2.0, 0.0, 1.0], group_ids=[0, 1, 1, 1])
    z_b = math.log((math.exp(3) + math.exp(-1) + math.exp(1)) / 3)
    target_a, targets_b, dr_a, dr_b = 1.0, [3.0, -1.0, 1.0], 0.5, [-0.5, 0.0, 1.0]

    def expected(log_z_a: float, log_z_b: float) -> float:
        a = (target_a - dr_a - log_z_a) ** 2
        b = sum((t - d - log_z_b) ** 2 for t, d in zip(targets_b, dr_b)) / 3
        return (a + b) / 2

    h = dict(beta=1.0, log_z0=2.0, reward_scale=2.0, reward_shift=-1.0)
    for mode, (za, zb) in {"prefix": (2.0, 1.0), "fixed": (2.0, 2.0), "sampled": (1.0, z_b),
                           "sampled_prefix": (1.0, z_b - 1.0)}.items():
        loss, m = get_loss("rao")(s, log_z=mode, **h)
        assert loss.item() == pytest.approx(expected(za, zb)), mode
        assert m["log_z"] == pytest.approx((za + zb) / 2), mode
    # the older spelling is the same setting; both at once is refused, as is an unknown mode
    assert get_loss("rao")(s, prefix_consistency=False, **h)[0].item() == pytest.approx(expected(2.0, 2.0))
    with pytest.raises(ValueError, match="log_z must be one of"):
        get_loss("rao")(s, log_z="mean", **h)
    with pytest.raises(ConfigError, match="'loss.prefix_consistency' and 'loss.log_z'"):
        load_config(None, ["loss.name=rao", "loss.log_z=fixed", "loss.prefix_consistency=false"])
    cfg = load_config(None, ["loss.name=rao", "loss.beta=1.0", "loss.log_z0=2.0", "loss.reward_scale=2.0",
                             "loss.reward_shift=-1.0", "loss.reward_normalization=none", "loss.log_z=sampled"])
    assert cfg.loss.build()(s)[0].item() == pytest.approx(expected(1.0, z_b))


def test_rao_sampled_log_z_start_up_line_uses_each_groups_estimate():
    from rao_megatron.losses.calibration import target_range

    # rewards {0, 1} at β 1: a group [1, 0] has log Z = log((e + 1)/2); targets 1 − that and −that
    z = math.log((math.e + 1) / 2)
    t = target_range([[1.0, 0.0], [0.0, 0.0]], beta=1.0, log_z0=5.0, sampled=True)
    assert (t.min, t.max) == (pytest.approx(-z), pytest.approx(1 - z))  # the tied group's targets are 0
    assert t.mean == pytest.approx((1 - 2 * z) / 4)
    bound = get_loss("rao").bind({"beta": 1.0, "log_z": "sampled", "log_z0": 5.0})
    line = [x for x in bound.startup_lines([[1.0, 0.0], [0.0, 0.0]]) if x.startswith("RAO targets")][0]
    assert "log-mean-exp of r/β" in line and f"max {1 - z:+.2f}" in line


def test_rao_all_tied_group_is_not_counted_as_displaced():
    # an all-wrong group (rewards 0, 0) with both answers less likely than under the reference: before,
    # its first answer counted as the "best" one and as displaced; now only the tied counts see it
    s = stats(policy_logps=[-3.0, -4.0, -1.0, -2.0], ref_logps=[-2.0, -2.0, -2.0, -2.0],
              policy_prompt_logps=[0.0] * 4, ref_prompt_logps=[0.0] * 4, lengths=[1] * 4,
              rewards=[0.0, 0.0, 1.0, 0.0], group_ids=[0, 0, 1, 1])
    _, m = get_loss("rao")(s, beta=0.1, log_z0=math.log(50))
    assert m["displacement"] == 0.0  # group 1's best (Δ_R = +1) is not displaced; group 0 is tied
    assert m["tied_share"] == pytest.approx(0.5) and m["tied/delta_r"] == pytest.approx((-1.0 - 2.0) / 2)
    assert m["rewards/gap"] == pytest.approx(0.1 * (1.0 - 0.0))  # group 1 only: β·(Δ_R best − Δ_R worst)
    _, only_tied = get_loss("rao")(stats(policy_logps=[-3.0, -4.0], ref_logps=[-2.0, -2.0],
                                         policy_prompt_logps=[0.0] * 2, ref_prompt_logps=[0.0] * 2,
                                         lengths=[1, 1], rewards=[0.0, 0.0], group_ids=[0, 0]))
    # nothing to measure there: NaN (the step's average skips it, so the record has no such key)
    assert math.isnan(only_tied["displacement"]) and math.isnan(only_tied["rewards/best"])
    assert only_tied["tied_share"] == 1.0


PAIR = dict(policy_logps=[-1.0, -3.0], ref_logps=[-2.0, -2.0], lengths=[2, 4], group_ids=[0, 0])
# Δ(w) = 1, Δ(l) = -1


def test_dpo_hand_computed():
    loss, m = get_loss("dpo")(stats(**PAIR), beta=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # −log σ(0.5·2)
    assert m["rewards/chosen"] == pytest.approx(0.5)
    assert m["rewards/rejected"] == pytest.approx(-0.5)
    assert m["rewards/accuracy"] == 1.0
    loss, _ = get_loss("dpo")(stats(**PAIR), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e))


def test_ipo_hand_computed():
    # h = 1/2 − (−1)/4 = 0.75; 1/(2β) = 1 for β = 0.5 -> (0.75 − 1)² = 0.0625
    loss, _ = get_loss("ipo")(stats(**PAIR), beta=0.5)
    assert loss.item() == pytest.approx(0.0625)


def test_slic_hand_computed():
    # 1 − 0.25·2 = 0.5 ; with β = 1: max(0, 1 − 2) = 0
    assert get_loss("slic")(stats(**PAIR), beta=0.25)[0].item() == pytest.approx(0.5)
    assert get_loss("slic")(stats(**PAIR), beta=1.0)[0].item() == 0.0


def test_simpo_hand_computed():
    # R/L: w = −1/2, l = −3/4 -> β·(0.25) − γ = 2·0.25 − 0.3 = 0.2
    loss, _ = get_loss("simpo")(stats(**PAIR), beta=2.0, gamma=0.3)
    assert loss.item() == pytest.approx(-math.log(sig(0.2)))


def test_orpo_hand_computed():
    # ℓ̄_w = −0.5, ℓ̄_l = −0.75; log-odds(x) = x − log(1 − e^x)
    lo = lambda x: x - math.log(1 - math.exp(x))  # noqa: E731
    expected = 0.5 - 0.2 * math.log(sig(lo(-0.5) - lo(-0.75)))
    loss, m = get_loss("orpo")(stats(**PAIR), lam=0.2)
    assert loss.item() == pytest.approx(expected)
    assert m["nll"] == pytest.approx(0.5)


def test_rpo_hand_computed():
    # β(Δw − Δl) = 0.5·2 = 1, r_w − r_l = 3 − 1.5 = 1.5 -> (1 − 1.5)² = 0.25
    loss, _ = get_loss("rpo")(stats(**PAIR, rewards=[3.0, 1.5]), beta=0.5)
    assert loss.item() == pytest.approx(0.25)


def test_cal_dpo_hand_computed():
    # −log σ(2) + ½[(1 − 1)² + (−1 + 1)²] with β = 0.5 (1/(2β) = 1)
    loss, _ = get_loss("cal_dpo")(stats(**PAIR), beta=0.5)
    assert loss.item() == pytest.approx(-math.log(sig(2.0)))
    # β = 0.25 -> 1/(2β) = 2: −log σ(2) + ½[1 + 1]
    loss, _ = get_loss("cal_dpo")(stats(**PAIR), beta=0.25)
    assert loss.item() == pytest.approx(-math.log(sig(2.0)) + 1.0)


def test_sft_hand_computed_token_mean():
    # two sequences, NLL sums 1 + 3 over 2 + 4 tokens -> 4/6
    loss, m = get_loss("sft")(stats(policy_logps=[-1.0, -3.0], lengths=[2, 4], group_ids=[0, 1]))
    assert loss.item() == pytest.approx(4 / 6)
    assert m["ppl"] == pytest.approx(math.exp(4 / 6))


def test_bt_hand_computed():
    s = stats(policy_logps=None, scores=[2.0, 0.5], lengths=[1, 1], group_ids=[0, 0])
    loss, m = get_loss("bt")(s)
    assert loss.item() == pytest.approx(-math.log(sig(1.5)))
    assert m["accuracy"] == 1.0
    loss, _ = get_loss("bt")(s, margin=0.5, centering=0.1)
    assert loss.item() == pytest.approx(-math.log(sig(1.0)) + 0.1 * 2.5 ** 2)


def test_grao_hand_computed():
    # G = 2 samples + reference y. rewards: o1 = 1, o2 = 0, y = 2 -> mean 1, unbiased std 1
    # Â = [0, −1, 1]; J = R/L: o1 = −1, o2 = −2, y = −0.5
    # term_1 = 0·(−1) + β·1·(−0.5) + λ·0·… = −0.5β
    # term_2 = −1·(−2) + β·1·(−0.5) + λ·(−1)·(−2 + 0.5) = 2 − 0.5β + 1.5λ
    # J = (term_1 + term_2)/2 ; loss = −J
    beta, lam = 0.5, 0.6
    s = stats(policy_logps=[-2.0, -6.0, -1.0], lengths=[2, 3, 2], rewards=[1.0, 0.0, 2.0],
              group_ids=[3, 3, 3], is_reference_answer=[False, False, True])
    loss, _ = get_loss("grao")(s, beta=beta, lam=lam)
    j = ((-0.5 * beta) + (2 - 0.5 * beta + 1.5 * lam)) / 2
    assert loss.item() == pytest.approx(-j, rel=1e-5)


def test_grao_paper_advantages_terms_and_no_imitation():
    # the batch above with advantage_norm=samples (Eq. 4): samples o1 = 1, o2 = 0 -> mean 0.5, population std
    # 0.5 -> Â = [1, −1]; y: (2 − 0.5)/0.5 = 3. J: o1 = −1, o2 = −2, y = −0.5
    # exploration: (1·(−1) + (−1)·(−2))/2 = 0.5;  imitation: β·3·(−0.5) = −1.5β
    # alignment: λ·(1·(−1 + 0.5) + (−1)·(−2 + 0.5))/2 = 0.5λ
    beta, lam = 0.5, 0.6
    s = stats(policy_logps=[-2.0, -6.0, -1.0], lengths=[2, 3, 2], rewards=[1.0, 0.0, 2.0],
              group_ids=[3, 3, 3], is_reference_answer=[False, False, True])
    loss, m = get_loss("grao")(s, beta=beta, lam=lam, advantage_norm="samples")
    assert m["objective/exploration"].item() == pytest.approx(0.5)
    assert m["objective/imitation"].item() == pytest.approx(-1.5 * beta)
    assert m["objective/alignment"].item() == pytest.approx(0.5 * lam)
    assert m["advantage/reference"].item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(-(0.5 - 1.5 * beta + 0.5 * lam))
    assert m["objective"].item() == pytest.approx(0.5 - 1.5 * beta + 0.5 * lam)
    # the default (y among the members, unbiased std): Â = [0, −1, 1], as test_grao_hand_computed
    _, m = get_loss("grao")(s, beta=beta, lam=lam)
    assert m["objective/exploration"].item() == pytest.approx(1.0)  # (0 + 2)/2
    assert m["objective/imitation"].item() == pytest.approx(-0.5 * beta)
    # β = 0: the paper's "w/o imitation" ablation, y's term gone
    loss0, m0 = get_loss("grao")(s, beta=0.0, lam=lam, advantage_norm="samples")
    assert m0["objective/imitation"].item() == 0.0 and loss0.item() == pytest.approx(-(0.5 + 0.5 * lam))
    # every sample wrong, y right: the samples' std is 0 and taken as 1 -> Â_i = 0, Â_y = 1 − 0 = 1
    tied = stats(policy_logps=[-2.0, -6.0, -1.0], lengths=[2, 3, 2], rewards=[0.0, 0.0, 1.0],
                 group_ids=[3, 3, 3], is_reference_answer=[False, False, True])
    loss, m = get_loss("grao")(tied, beta=beta, lam=lam, advantage_norm="samples")
    assert m["advantage/reference"].item() == pytest.approx(1.0)
    assert loss.item() == pytest.approx(-(beta * 1.0 * -0.5))  # imitation only: β·Â_y·J(y)


# ---------------------------------------------------------------------------------------------
# Direct per-group implementations, written independently of the library, on random batches
# ---------------------------------------------------------------------------------------------

def random_batch(seed: int, sizes: list[int], *, with_ref_answer: bool = False) -> SequenceStats:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    gid = torch.cat([torch.full((k,), 100 - i) for i, k in enumerate(sizes)])  # ids not sorted, not dense
    perm = torch.randperm(n, generator=g)
    prompt_p = torch.randn(len(sizes), generator=g, dtype=torch.float64)[torch.cat(
        [torch.full((k,), i) for i, k in enumerate(sizes)])]
    prompt_r = torch.randn(len(sizes), generator=g, dtype=torch.float64)[torch.cat(
        [torch.full((k,), i) for i, k in enumerate(sizes)])]
    is_ref = None
    if with_ref_answer:
        is_ref = torch.cat([torch.arange(k) == k - 1 for k in sizes])[perm]
    return SequenceStats(
        policy_logps=(-torch.rand(n, generator=g, dtype=torch.float64) * 20 - 0.1)[perm],
        ref_logps=(-torch.rand(n, generator=g, dtype=torch.float64) * 20 - 0.1)[perm],
        policy_prompt_logps=(prompt_p - 5)[perm], ref_prompt_logps=(prompt_r - 5)[perm],
        lengths=torch.randint(1, 30, (n,), generator=g)[perm],
        rewards=torch.randn(n, generator=g, dtype=torch.float64)[perm],
        group_ids=gid[perm], is_reference_answer=is_ref,
        scores=torch.randn(n, generator=g, dtype=torch.float64)[perm])


def by_group(s: SequenceStats) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, gid in enumerate(s.group_ids.tolist()):
        out.setdefault(gid, []).append(i)
    return list(out.values())


def ls(x: float) -> float:  # log σ(x), stable
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def direct_pair_loss(name: str, s: SequenceStats, w: int, l: int, hp: dict) -> float:
    pol, ref, L, r, sc = (s.policy_logps.tolist(), s.ref_logps.tolist(), s.lengths.tolist(),
                          s.rewards.tolist(), s.scores.tolist())
    dw, dl = pol[w] - ref[w], pol[l] - ref[l]
    b = hp.get("beta")
    if name == "dpo":
        e = hp.get("label_smoothing", 0.0)
        return -(1 - e) * ls(b * (dw - dl)) - e * ls(-b * (dw - dl))
    if name == "ipo":
        return ((dw / L[w] - dl / L[l]) - 1 / (2 * b)) ** 2
    if name == "slic":
        return max(0.0, 1 - b * (dw - dl))
    if name == "simpo":
        return -ls(b * (pol[w] / L[w] - pol[l] / L[l]) - hp["gamma"])
    if name == "orpo":
        mw, ml = pol[w] / L[w], pol[l] / L[l]
        odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
        return -mw - hp["lam"] * ls(odds(mw) - odds(ml))
    if name == "rpo":
        return (b * (dw - dl) - (r[w] - r[l])) ** 2
    if name == "cal_dpo":
        return -ls(dw - dl) + 0.5 * ((dw - 1 / (2 * b)) ** 2 + (dl + 1 / (2 * b)) ** 2)
    if name == "bt":
        return -ls(sc[w] - sc[l] - hp["margin"]) + hp["centering"] * (sc[w] + sc[l]) ** 2
    raise AssertionError(name)


def direct_pairwise(name: str, s: SequenceStats, hp: dict, pairing: str) -> float:
    r = s.rewards.tolist()
    group_losses = []
    for members in by_group(s):
        if pairing == "best_vs_rest":
            best = max(members, key=lambda i: (r[i], -i))
            pairs = [(best, j) for j in members if r[j] < r[best]]
        else:
            pairs = [(i, j) for i in members for j in members if r[i] > r[j]]
        group_losses.append(sum(direct_pair_loss(name, s, w, l, hp) for w, l in pairs) / len(pairs))
    return sum(group_losses) / len(group_losses)


PAIRWISE_HP = {
    "dpo": {"beta": 0.3, "label_smoothing": 0.1}, "ipo": {"beta": 0.4}, "slic": {"beta": 0.05},
    "simpo": {"beta": 2.5, "gamma": 0.7}, "orpo": {"lam": 0.3}, "rpo": {"beta": 0.2},
    "cal_dpo": {"beta": 0.3}, "bt": {"margin": 0.2, "centering": 0.01},
}


@pytest.mark.parametrize("name", sorted(PAIRWISE_HP))
@pytest.mark.parametrize("pairing", ["best_vs_rest", "all_pairs"])
@pytest.mark.parametrize("sizes", [[2, 2, 2], [4, 4], [2, 4, 3, 2]])
def test_pairwise_losses_match_direct_formula(name, pairing, sizes):
    for seed in range(3):
        s = random_batch(seed, sizes)
        hp = PAIRWISE_HP[name]
        loss, _ = get_loss(name)(s, pairing=pairing, **hp)
        assert loss.item() == pytest.approx(direct_pairwise(name, s, hp, pairing), rel=1e-9, abs=1e-12)


def direct_rao(s: SequenceStats, beta: float, log_z0: float, scale: float, shift: float) -> float:
    pol, ref, pp, pr, r = (x.tolist() for x in (s.policy_logps, s.ref_logps, s.policy_prompt_logps,
                                                s.ref_prompt_logps, s.rewards))
    out = []
    for members in by_group(s):
        log_z = log_z0 + (pp[members[0]] - pr[members[0]])
        out.append(sum((scale * r[j] + shift - beta * (pol[j] - ref[j]) - beta * log_z) ** 2
                       for j in members) / len(members))
    return sum(out) / len(out)


@pytest.mark.parametrize("sizes", [[1, 1, 1], [2, 2], [4, 4, 4], [1, 2, 4, 3]])
def test_rao_matches_direct_formula(sizes):
    for seed in range(3):
        s = random_batch(seed, sizes)
        loss, _ = get_loss("rao")(s, beta=0.2, log_z0=1.3, reward_scale=1.5, reward_shift=0.25)
        assert loss.item() == pytest.approx(direct_rao(s, 0.2, 1.3, 1.5, 0.25), rel=1e-10)
        loss, _ = get_loss("rao")(s)  # defaults: β = 0.1, Z0 = 50
        assert loss.item() == pytest.approx(direct_rao(s, 0.1, math.log(50), 1.0, 0.0), rel=1e-10)


def direct_grao(s: SequenceStats, beta: float, lam: float) -> float:
    pol, L, r, ref = s.policy_logps.tolist(), s.lengths.tolist(), s.rewards.tolist(), s.is_reference_answer.tolist()
    out = []
    for members in by_group(s):
        rs = [r[i] for i in members]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((x - mean) ** 2 for x in rs) / (len(rs) - 1))
        adv = {i: (r[i] - mean) / (std + 1e-6) for i in members}
        y = next(i for i in members if ref[i])
        jy = pol[y] / L[y]
        samples = [i for i in members if not ref[i]]
        obj = sum(adv[i] * pol[i] / L[i] + beta * adv[y] * jy + lam * adv[i] * (pol[i] / L[i] - jy)
                  for i in samples) / len(samples)
        out.append(-obj)
    return sum(out) / len(out)


@pytest.mark.parametrize("sizes", [[2, 2], [5, 9], [3, 9, 2]])
def test_grao_matches_direct_formula(sizes):
    for seed in range(3):
        s = random_batch(seed, sizes, with_ref_answer=True)
        loss, _ = get_loss("grao")(s, beta=0.5, lam=0.6)
        assert loss.item() == pytest.approx(direct_grao(s, 0.5, 0.6), rel=1e-9)


def test_sft_matches_direct_formula():
    s = random_batch(0, [1, 3, 2])
    loss, _ = get_loss("sft")(s)
    assert loss.item() == pytest.approx(-s.policy_logps.sum().item() / s.lengths.sum().item())


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

def _leaf(s: SequenceStats, *names: str) -> SequenceStats:
    for n in names:
        setattr(s, n, getattr(s, n).clone().requires_grad_(True))
    return s


def test_rao_prompt_logps_get_no_gradient_but_change_the_target():
    s = _leaf(random_batch(1, [2, 3]), "policy_logps", "policy_prompt_logps")
    loss, _ = get_loss("rao")(s)
    loss.backward()
    assert s.policy_prompt_logps.grad is None or torch.count_nonzero(s.policy_prompt_logps.grad) == 0
    assert torch.count_nonzero(s.policy_logps.grad) == s.num_sequences
    # Δ_P still enters the value: shifting P_θ of group members changes the loss
    s2 = random_batch(1, [2, 3])
    s2.policy_prompt_logps = s2.policy_prompt_logps + 1.0
    assert get_loss("rao")(s2)[0].item() != pytest.approx(get_loss("rao")(random_batch(1, [2, 3]))[0].item())


def test_rao_gradient_matches_detached_formula():
    # d/dR_θ(j) of (1/K)Σ(r − r̂)² is −(2β/K)(r_j − r̂_j) / G (prefix term treated as a constant)
    s = _leaf(random_batch(2, [3, 1]), "policy_logps", "policy_prompt_logps")
    beta = 0.3
    loss, _ = get_loss("rao")(s, beta=beta, log_z0=0.0)
    loss.backward()
    with torch.no_grad():
        ids = s.group_ids.tolist()
        k = torch.tensor([ids.count(i) for i in ids], dtype=torch.float64)
        r_hat = beta * (s.policy_logps - s.ref_logps) + beta * (s.policy_prompt_logps - s.ref_prompt_logps)
        expected = -(2 * beta / k) * (s.rewards - r_hat) / 2
    torch.testing.assert_close(s.policy_logps.grad, expected)


def test_rao_log_z0_shifts_every_target_by_beta_times_delta():
    s = random_batch(3, [2, 4])
    beta, a, b = 0.25, 0.5, 2.0
    _, m_a = get_loss("rao")(s, beta=beta, log_z0=a)
    _, m_b = get_loss("rao")(s, beta=beta, log_z0=b)
    # r̂ moves by β·Δlog_z0, so the mean residual moves by −β·Δlog_z0
    assert m_b["rewards/best"] - m_a["rewards/best"] == pytest.approx(beta * (b - a))
    assert m_b["residual"] - m_a["residual"] == pytest.approx(-beta * (b - a))
    # and z0 is exp(log_z0)
    assert get_loss("rao")(s, beta=beta, z0=math.exp(b))[0].item() == pytest.approx(
        get_loss("rao")(s, beta=beta, log_z0=b)[0].item())


def test_rao_gradient_descent_on_free_delta_r_reaches_the_rewards():
    s = random_batch(4, [1, 2, 4])
    beta, log_z0 = 0.5, math.log(5.0)
    free = torch.zeros(s.num_sequences, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([free], lr=10.0)
    for _ in range(500):
        s.policy_logps = s.ref_logps + free
        loss, _ = get_loss("rao")(s, beta=beta, log_z0=log_z0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        log_z = log_z0 + (s.policy_prompt_logps - s.ref_prompt_logps)
        torch.testing.assert_close(beta * free + beta * log_z, s.rewards, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_invariant_to_order_of_groups_and_sequences(name):
    s = random_batch(5, [3, 2, 4], with_ref_answer=(name == "grao"))
    perm = torch.randperm(s.num_sequences, generator=torch.Generator().manual_seed(0))
    shuffled = SequenceStats(**{k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()})
    a, ma = get_loss(name)(s)
    b, mb = get_loss(name)(shuffled)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert ma.keys() == mb.keys()


def test_pairing_modes_differ_on_groups_of_four():
    s = random_batch(6, [4])
    a = get_loss("dpo")(s, pairing="best_vs_rest")[0].item()
    b = get_loss("dpo")(s, pairing="all_pairs")[0].item()
    assert a != pytest.approx(b)


def test_pairs_without_rewards_take_first_as_chosen_and_ties_form_no_pair():
    from rao_megatron.losses import make_groups, preference_pairs
    g = make_groups(T([5, 5, 5, 9, 9]))
    w, l = preference_pairs(g, None)
    assert list(zip(w.tolist(), l.tolist())) == [(0, 1), (0, 2), (3, 4)]
    w, l = preference_pairs(g, T([1.0, 3.0, 1.0, 0.0, 2.0]))
    assert list(zip(w.tolist(), l.tolist())) == [(1, 0), (1, 2), (4, 3)]
    w, l = preference_pairs(g, T([1.0, 3.0, 3.0, 0.0, 2.0]), "all_pairs")
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 0), (2, 0), (4, 3)]


def test_normalizer_makes_split_batches_add_up():
    # the engine's contract: summing micro-batch losses computed with the global normaliser
    # gives the whole-batch loss
    for name in ("rao", "dpo", "sft"):
        s = random_batch(7, [2, 2, 2, 2])
        spec = get_loss(name)
        full, _ = spec(s)
        ids = s.group_ids.unique()
        parts = []
        for half in (ids[:2], ids[2:]):
            m = torch.isin(s.group_ids, half)
            sub = SequenceStats(**{k: (v[m] if isinstance(v, torch.Tensor) else v) for k, v in vars(s).items()})
            parts.append(spec(sub, normalizer=spec.normalizer(s.lengths, s.group_ids))[0])
        assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,hp,match", [
    ("rao", {"beta": 0.0}, "beta must be a finite number > 0"),
    ("rao", {"beta": -1.0}, "beta"),
    ("dpo", {"beta": 0}, "beta"),
    ("ipo", {"beta": -0.1}, "beta"),
    ("simpo", {"beta": 0.0}, "beta"),
    ("grao", {"beta": -0.1}, "beta must be a finite number >= 0"),
    ("grao", {"advantage_norm": "paper"}, "advantage_norm must be one of group, samples"),
    ("rao", {"z0": 0.0}, "z0 must be"),
    ("rao", {"z0": -5.0}, "z0 must be"),
    ("rao", {"z0": 50.0, "log_z0": 3.9}, "either z0 or log_z0"),
    ("rao", {"log_z0": float("nan")}, "log_z0"),
    ("dpo", {"label_smoothing": 0.5}, "label_smoothing"),
    ("dpo", {"pairing": "everything"}, "pairing must be one of"),
    ("rao", {"gamma": 1.0}, "no hyper-parameter 'gamma'"),
    ("dpo", {"bta": 0.1}, "did you mean beta"),
])
def test_bad_hyper_parameters(name, hp, match):
    s = random_batch(8, [2, 2], with_ref_answer=(name == "grao"))
    with pytest.raises(ValueError, match=match):
        get_loss(name)(s, **hp)


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo", "orpo", "rpo", "cal_dpo", "bt"])
def test_pairwise_loss_rejects_group_of_one(name):
    s = random_batch(9, [2, 1])
    with pytest.raises(ValueError, match="at least 2 responses per group; group_id=99 has 1"):
        get_loss(name)(s)


def test_pairwise_loss_rejects_all_tied_group():
    s = random_batch(9, [2, 3])
    s.rewards = T([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="are equal, so it has no preference pair"):
        get_loss("dpo")(s)


@pytest.mark.parametrize("name", ["rao", "rpo", "grao"])
def test_rewards_required(name):
    s = random_batch(10, [2, 2], with_ref_answer=True)
    s.rewards = None
    with pytest.raises(ValueError, match=f"loss '{name}' needs SequenceStats.rewards"):
        get_loss(name)(s)


def test_reference_required_for_reference_losses():
    s = random_batch(10, [2, 2])
    s.ref_logps = None
    for name in ("rao", "dpo", "ipo", "slic", "rpo", "cal_dpo"):
        with pytest.raises(ValueError, match="ref_logps"):
            get_loss(name)(s)
    get_loss("simpo")(s)  # reference-free losses do not need it
    get_loss("orpo")(s)


def test_unknown_loss_names_close_matches():
    with pytest.raises(ValueError, match="unknown loss 'rao2'.*did you mean rao"):
        get_loss("rao2")


def test_grao_needs_exactly_one_reference_answer():
    s = random_batch(11, [3, 3], with_ref_answer=True)
    s.is_reference_answer = torch.zeros(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="0 reference answers"):
        get_loss("grao")(s)


def test_sequence_stats_validates_shapes():
    with pytest.raises(ValueError, match="ref_logps must be 1-D with one entry per sequence"):
        SequenceStats(policy_logps=torch.zeros(3), ref_logps=torch.zeros(2), lengths=torch.ones(3),
                      group_ids=torch.zeros(3, dtype=torch.int64))


def test_float32_inputs_give_float32_loss():
    s = random_batch(12, [2, 2])
    s32 = SequenceStats(**{k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                           for k, v in vars(s).items()})
    for name in ("rao", "dpo", "simpo"):
        loss, _ = get_loss(name)(s32)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(get_loss(name)(s)[0].item(), rel=1e-5)


random.seed(0)
