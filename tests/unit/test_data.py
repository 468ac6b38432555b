"""Data layer: formats, tokenization through the tiny tokenizer, t0 rule, length policy, batching, resume."""

from __future__ import annotations

import filecmp
import json
import math
import random
from pathlib import Path

import pytest
import torch

from rao_megatron.data.batcher import GroupBatcher
from rao_megatron.data.collate import PAD_GROUP
from rao_megatron.data.errors import DROP_REASONS, DataError
from rao_megatron.data.formats import Example, read_examples
from rao_megatron.data.tokenize import TokenizedGroup, end_of_turn_ids, split_heldout, tokenize_examples
from rao_megatron.data.tokenizer import TINY_TOKENIZER_DIR, build_tiny_tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _render(tok, prompt, response=None) -> str:
    msgs = prompt + ([{"role": "assistant", "content": response}] if response is not None else [])
    return tok.apply_chat_template(msgs, add_generation_prompt=response is None, tokenize=False)


# ---------------------------------------------------------------- tokenizer

def test_tiny_tokenizer_committed_files_match_a_fresh_build(tmp_path):
    build_tiny_tokenizer(tmp_path)
    names = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    _, mismatch, errors = filecmp.cmpfiles(TINY_TOKENIZER_DIR, tmp_path, names, shallow=False)
    assert not mismatch and not errors, "regenerate with `python -m rao_megatron.data.tokenizer`"


def test_tiny_tokenizer_is_byte_level_chatml(tok):
    assert len(tok) < 512
    assert tok("Az", add_special_tokens=False)["input_ids"] == [ord("A"), ord("z")]  # id == byte
    assert tok.decode(tok("héllo wörld ✓", add_special_tokens=False)["input_ids"]) == "héllo wörld ✓"
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == ["<|im_end|>"]
    rendered = _render(tok, [{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_tokenizer(tmp_path / "no_such_dir")
    d = tmp_path / "no_template"
    build_tiny_tokenizer(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no_template.*no chat template"):
        load_tokenizer(d)


# ---------------------------------------------------------------- formats

def test_group_format_with_messages_reference_and_blank_line():
    ex = read_examples(DATA / "groups.jsonl")
    assert [e.row for e in ex] == [1, 2, 3, 4, 6]  # JSONL rows are line numbers; line 5 is blank
    assert all(e.kind == "group" for e in ex)
    assert ex[0].prompt == [{"role": "user", "content": "What is the capital of France?"}]
    assert ex[0].rewards == [1.0, -1.0, 0.5]
    assert [m["role"] for m in ex[1].prompt] == ["system", "user"]
    assert ex[3].responses[-1] == "Le chat." and ex[3].reference_answer == 2 and ex[3].rewards == [-0.5, 0.8, 1.0]


def test_pairs_and_ultrafeedback_binarized():
    pairs = read_examples(DATA / "pairs.jsonl")
    assert pairs[1].kind == "pair" and pairs[1].responses == ["No, the earth is an oblate spheroid.", "Yes."]
    assert pairs[1].rewards is None and pairs[1].prompt == [{"role": "user", "content": "Is the earth flat?"}]
    ufb = read_examples(DATA / "ultrafeedback_binarized.jsonl")  # has `messages` too: still pairs
    assert ufb[0].kind == "pair" and ufb[0].responses == ["A spider has eight legs.", "Six legs."]
    assert ufb[0].prompt == [{"role": "user", "content": "How many legs does a spider have?"}]
    assert ufb[0].rewards == [9.0, 3.5]


def test_ultrafeedback_raw_overall_and_fine_grained():
    overall = read_examples(DATA / "ultrafeedback_raw.jsonl")
    assert overall[0].rewards == [8.5, 4.0, 7.0] and overall[0].unrated == 0
    assert overall[0].prompt == [{"role": "user", "content": "Explain gravity in one sentence."}]
    fine = read_examples(DATA / "ultrafeedback_raw.jsonl", reward_field="fine_grained")
    # "N/A" ratings are skipped; the third completion has only "N/A", so it is left out and counted
    assert fine[0].rewards == [4.5, 2.5] and fine[0].unrated == 1 and len(fine[0].responses) == 2
    _, report = tokenize_examples(fine, load_tokenizer(None), max_length=512)
    assert report.dropped["response_no_rating"] == 1


def test_sft_takes_the_last_assistant_turn():
    ex = read_examples(DATA / "ultrachat_sft.jsonl")
    assert [e.kind for e in ex] == ["sft", "sft"]
    assert ex[1].responses == ["Octopuses have three hearts."]
    assert [m["content"] for m in ex[1].prompt] == ["Tell me a fact.", "Honey never spoils.", "Another?"]


def test_forced_format_and_undetectable_rows(tmp_path):
    with pytest.raises(DataError, match=r"pairs\.jsonl: line 1: field 'responses': missing"):
        read_examples(DATA / "pairs.jsonl", format="group")
    f = tmp_path / "odd.jsonl"
    f.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"odd\.jsonl: line 1: cannot tell the row format"):
        read_examples(f)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_examples(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name, where, field", [
    ("bad_json", "line 2", None),
    ("bad_missing_field", "line 2", "prompt"),
    ("bad_score_type", "line 2", "score_chosen"),
    ("bad_nan_reward", "line 3", "rewards[0]"),
    ("bad_empty_response", "line 1", "responses[1]"),
    ("bad_reward_count", "line 1", "rewards"),
])
def test_malformed_rows_name_file_row_and_field(name, where, field):
    with pytest.raises(DataError) as info:
        read_examples(DATA / f"{name}.jsonl")
    msg = str(info.value)
    assert msg.startswith(str(DATA / f"{name}.jsonl") + f": {where}: ")
    assert info.value.where == where and info.value.field == field
    if field is not None:
        assert f"field '{field}'" in msg


def test_parquet_rows_are_zero_based(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (DATA / "ultrafeedback_binarized.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ufb.parquet")
    ex = read_examples(tmp_path / "ufb.parquet")
    assert [e.row for e in ex] == [0, 1] and ex[0].responses == ["A spider has eight legs.", "Six legs."]
    rows[1]["score_rejected"] = math.inf
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row 1 \(0-based\): field 'score_rejected': .*finite"):
        read_examples(tmp_path / "bad.parquet")


def test_saved_datasets_directory(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (DATA / "pairs.jsonl").read_text().splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    ex = read_examples(tmp_path / "ds")
    assert [e.row for e in ex] == [0, 1, 2] and ex[2].responses == ["Blue.", "Seven."]


# ---------------------------------------------------------------- tokenization

def test_tokens_match_the_chat_template(tok):
    ex = read_examples(DATA / "groups.jsonl")
    groups, report = tokenize_examples(ex, tok, max_length=512, source="groups.jsonl")
    assert report.rows_read == 5 and report.groups_kept == 5 and report.responses_kept == 15
    assert report.t0 == tok.convert_tokens_to_ids("<|im_start|>")
    for e, g in zip(ex, groups):
        assert g.group_id == g.row == e.row
        assert tok.decode(g.prompt_ids) == _render(tok, e.prompt)
        for text, y in zip(e.responses, g.responses):
            assert tok.decode(y) == text + "<|im_end|>"
            # prompt ⊕ response is the whole conversation as the template renders it (less the final "\n")
            assert tok.decode(g.prompt_ids + y) + "\n" == _render(tok, e.prompt, text)
    assert groups[3].is_reference == [False, False, True] and groups[0].is_reference is None


def test_t0_mismatch_names_the_row(tok, tmp_path):
    # Models the real case of a template without a fixed first token (a base model's "role: content"
    # template, no BOS): a row with a system prompt starts with "system", the others with "user".
    plain = load_tokenizer(None)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert end_of_turn_ids(plain) == [plain.eos_token_id]  # the template closes no turn: eos ends responses
    ex = read_examples(DATA / "groups.jsonl")
    with pytest.raises(DataError) as info:
        tokenize_examples(ex, plain, max_length=512, source="groups.jsonl")
    msg = str(info.value)
    assert msg.startswith("groups.jsonl: line 2: field 'prompt'")
    assert "'s'" in msg and "'u'" in msg and "line 1" in msg
    # a held-out file is checked against the training data's t0
    _, report = tokenize_examples(ex[:1], tok, max_length=512)
    with pytest.raises(DataError, match="line 1.*t0"):
        tokenize_examples(ex[:1], plain, max_length=512, t0=report.t0)


def test_overlength_drop_and_truncate_are_counted(tok):
    ex = read_examples(DATA / "groups.jsonl")
    full, _ = tokenize_examples(ex, tok, max_length=10_000)
    max_length = 45
    fits = {g.row: [len(g.prompt_ids) + len(y) <= max_length for y in g.responses] for g in full}
    room_for_prompt = {g.row: len(g.prompt_ids) < max_length for g in full}
    assert not all(room_for_prompt.values()) and not all(all(f) for f in fits.values())
    kept, report = tokenize_examples(ex, tok, max_length=max_length, overlength="drop")
    assert all(len(g.prompt_ids) + len(y) <= max_length for g in kept for y in g.responses)
    assert report.dropped["group_prompt_overlength"] == sum(not r for r in room_for_prompt.values())
    assert report.dropped["response_overlength"] == sum(f.count(False) for r, f in fits.items()
                                                        if room_for_prompt[r])
    assert report.dropped["group_too_few_responses"] == 1   # line 1: none of its 3 responses fits
    assert report.dropped["group_lost_reference"] == 1      # line 4: its reference answer does not fit
    assert report.groups_kept == len(kept) == 2 and report.rows_read == 5

    cut, report = tokenize_examples(ex, tok, max_length=max_length, overlength="truncate")
    assert report.responses_truncated == sum(f.count(False) for r, f in fits.items() if room_for_prompt[r])
    assert report.groups_kept == sum(room_for_prompt.values()) == len(cut)
    originals = {g.row: g for g in full}
    for g in cut:
        for y, y_full in zip(g.responses, originals[g.row].responses):
            assert y == y_full[:max_length - len(g.prompt_ids)]  # a cut response loses its <|im_end|>
    # a prompt that leaves no room for a single response token is dropped even when truncating
    _, report = tokenize_examples(ex, tok, max_length=26, overlength="truncate")
    assert report.dropped["group_prompt_overlength"] == 5 and report.groups_kept == 0
    assert "the prompt alone leaves no room" in report.summary()


def test_max_responses_keeps_best_and_worst_and_the_reference(tok):
    ex = read_examples(DATA / "groups.jsonl")
    groups, report = tokenize_examples(ex, tok, max_length=512, max_responses=2)
    by_row = {g.row: g for g in groups}
    assert by_row[6].rewards == [0.8, -0.9]                 # best and worst of [0.8, -0.9, 0.6, 0.3]
    assert by_row[4].rewards == [0.8, 1.0] and by_row[4].is_reference == [False, True]
    assert report.dropped["response_over_max_responses"] == 1 + 1 + 2 + 1
    groups, _ = tokenize_examples(ex, tok, max_length=512, max_responses=3)
    assert {g.row: g for g in groups}[6].rewards == [0.8, -0.9, 0.6]


def test_pairwise_policy_ties_and_lost_preferred(tok):
    ufb = read_examples(DATA / "ultrafeedback_binarized.jsonl")
    groups, report = tokenize_examples(ufb, tok, max_length=512, min_responses=2)
    assert report.groups_kept == 2 and report.tied_groups_kept == 1
    groups, report = tokenize_examples(ufb, tok, max_length=512, min_responses=2, drop_tied=True)
    assert [g.row for g in groups] == [1] and report.dropped["group_tied_rewards"] == 1
    pairs = read_examples(DATA / "pairs.jsonl")  # unscored: order carries the preference
    full = tokenize_examples(pairs, tok, max_length=10_000)[0]
    lengths = [len(g.prompt_ids) + len(y) for g in full for y in g.responses]
    max_length = max(lengths[1:])  # only line 1's long chosen response no longer fits
    assert lengths[0] > max_length
    groups, report = tokenize_examples(pairs, tok, max_length=max_length, min_responses=2)
    assert 1 not in [g.row for g in groups] and report.dropped["group_lost_preferred"] == 1
    summary = report.summary().splitlines()
    assert summary[0].startswith("<data>: 3 rows read") and len(summary) == 1 + len(report.dropped)
    assert set(report.dropped) <= set(DROP_REASONS)


def test_rows_must_agree_on_rewards(tok):
    pairs = read_examples(DATA / "pairs.jsonl")
    pairs[2].rewards = [1.0, 0.0]
    with pytest.raises(DataError, match="line 3: field 'rewards': has rewards but line 1 lacks"):
        tokenize_examples(pairs, tok, max_length=512)


# ---------------------------------------------------------------- batching

def _synthetic_groups(tok, n: int = 12) -> list[TokenizedGroup]:
    examples = [Example(row=i, where=f"row {i}", prompt=[{"role": "user", "content": f"question {i}?"}],
                        responses=[f"answer {i}.{j}" * (1 + j) for j in range(1 + i % 3)],
                        rewards=[float(i + j) for j in range(1 + i % 3)], reference_answer=None, kind="group")
                for i in range(n)]
    return tokenize_examples(examples, tok, max_length=64)[0]


def _kw(tok, **over):
    kw = dict(seq_length=64, pad_id=tok.pad_token_id, groups_per_micro_batch=2, global_batch_groups=4,
              responses_per_group=3, seed=7)
    return {**kw, **over}


def _step_groups(mbs) -> list[int]:
    return [int(g) for mb in mbs for g in mb["group_ids"].unique().tolist() if g != PAD_GROUP]


def test_batches_have_fixed_shapes_and_whole_groups(tok):
    groups = _synthetic_groups(tok)
    by_id = {g.group_id: g for g in groups}
    b = GroupBatcher(groups, **_kw(tok))
    assert b.steps_per_epoch == 3 and b.micro_batches_per_step == 2
    for _ in range(5):
        for mb in b.next_step():
            assert mb["tokens"].shape == (6, 64) and mb["rewards"].shape == (6,) and "seq_keys" in mb
            gid = mb["group_ids"]
            for g in gid[gid != PAD_GROUP].unique().tolist():
                rows = torch.nonzero(gid == g).squeeze(1)
                assert len(rows) == len(by_id[g].responses)          # the whole group, in this micro-batch
                for r, y in zip(rows.tolist(), by_id[g].responses):
                    seq = by_id[g].prompt_ids + y
                    assert mb["tokens"][r, :len(seq)].tolist() == seq
                    assert mb["tokens"][r, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")


def test_dp_ranks_are_disjoint_and_cover_the_global_batch(tok):
    groups = _synthetic_groups(tok)
    single = GroupBatcher(groups, **_kw(tok))
    ranks = [GroupBatcher(groups, **_kw(tok, dp_rank=r, dp_size=2, groups_per_micro_batch=1)) for r in range(2)]
    seen: list[int] = []
    for _ in range(single.steps_per_epoch):
        whole = _step_groups(single.next_step())
        parts = [_step_groups(b.next_step()) for b in ranks]
        assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)
        seen += whole
    assert len(seen) == len(set(seen)) == 12  # each group once per epoch
    with pytest.raises(ValueError, match="global_batch_groups=6.*dp_size=2.*groups_per_micro_batch=2"):
        GroupBatcher(groups, **_kw(tok, global_batch_groups=6, dp_size=2))


def test_shuffle_is_deterministic_by_seed_and_epoch(tok):
    groups = _synthetic_groups(tok)
    a, b, c = (GroupBatcher(groups, **_kw(tok, seed=s)) for s in (7, 7, 8))
    stream_a = [_step_groups(a.next_step()) for _ in range(6)]
    assert stream_a == [_step_groups(b.next_step()) for _ in range(6)]
    assert stream_a != [_step_groups(c.next_step()) for _ in range(6)]
    assert stream_a[:3] != stream_a[3:]  # epoch 1 reshuffles


def test_resume_from_state_dict_gives_identical_batches(tok):
    groups = _synthetic_groups(tok)
    a = GroupBatcher(groups, **_kw(tok))
    for _ in range(2):
        a.next_step()
    state = a.state_dict()
    expected = [a.next_step() for _ in range(4)]  # crosses into epoch 1
    b = GroupBatcher(groups, **_kw(tok))
    b.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for want, got in zip(expected, [b.next_step() for _ in range(4)]):
        for x, y in zip(want, got):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="seed"):
        GroupBatcher(groups, **_kw(tok, seed=1)).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        GroupBatcher(groups[:-1], **_kw(tok)).load_state_dict(state)


def test_eval_pass_covers_every_group_once_with_fixed_shapes(tok):
    groups = _synthetic_groups(tok, n=5)
    ranks = [GroupBatcher(groups, **_kw(tok, dp_rank=r, dp_size=2)) for r in range(2)]
    per_rank = [list(b.iter_eval_microbatches()) for b in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == ranks[0].num_eval_microbatches == 2
    assert all(mb["tokens"].shape == (6, 64) for mbs in per_rank for mb in mbs)
    ids = [g for mbs in per_rank for g in _step_groups(mbs)]
    assert sorted(ids) == [g.group_id for g in groups]
    assert (per_rank[1][-1]["group_ids"] == PAD_GROUP).all()  # the tail is all padding


def test_reference_logps_come_from_the_lookup(tok):
    groups = _synthetic_groups(tok)

    class Cache:
        def __init__(self, table):
            self.table = table

        def lookup(self, keys):
            missing = [k for k in keys if k not in self.table]
            if missing:
                raise KeyError(f"{len(missing)} sequences have no precomputed reference log-probs")
            return [self.table[k][0] for k in keys], [self.table[k][1] for k in keys]

    full = GroupBatcher(groups, **_kw(tok))
    table = {int(k): (-float(k % 97), -float(k % 89)) for mb in full.iter_eval_microbatches()
             for k, g in zip(mb["seq_keys"], mb["group_ids"]) if g != PAD_GROUP}
    b = GroupBatcher(groups, **_kw(tok, reference=Cache(table)))
    mb = b.next_step()[0]
    real = mb["group_ids"] != PAD_GROUP
    keys = mb["seq_keys"][real].tolist()
    assert mb["ref_prompt_logps"][real].tolist() == [table[k][0] for k in keys]
    assert mb["ref_logps"][real].tolist() == [table[k][1] for k in keys]
    with pytest.raises(KeyError, match="no precomputed reference"):
        GroupBatcher(groups, **_kw(tok, reference=Cache({}))).next_step()


def test_split_heldout_is_deterministic_and_disjoint(tok):
    groups = _synthetic_groups(tok, n=20)
    train, held = split_heldout(groups, 0.25, seed=3)
    again = split_heldout(groups, 0.25, seed=3)
    assert [g.group_id for g in train] == [g.group_id for g in again[0]] and len(held) == 5
    assert not {g.group_id for g in train} & {g.group_id for g in held}
    assert sorted(g.group_id for g in train + held) == list(range(20))
    assert [g.group_id for g in split_heldout(groups, 0.25, seed=4)[1]] != [g.group_id for g in held]
    assert split_heldout(groups, 0.0, seed=3) == (groups, [])


def test_packed_batches_keep_each_groups_response_order():
    # pairs without rewards mean "chosen first": packing places longest-first, but the per-sequence tensors
    # must stay in data order, or a short chosen answer would be scored as the rejected one
    from rao_megatron.data import GroupBatcher, TokenizedGroup

    groups = [TokenizedGroup(group_id=g, prompt_ids=[1, 5], responses=[[7] * (2 + g), [8] * (9 + g)], rewards=None,
                             is_reference=None, row=g) for g in range(4)]
    padded = GroupBatcher(groups, seq_length=16, pad_id=0, groups_per_micro_batch=2, global_batch_groups=4)
    packed = GroupBatcher(groups, seq_length=16, pad_id=0, groups_per_micro_batch=2, global_batch_groups=4,
                          packing=True, packed_rows=3)
    a, b = padded.next_step(), packed.next_step()
    def by_group(mbs: list) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for mb in mbs:
            for k, g in zip(mb["seq_keys"].tolist(), mb["group_ids"].tolist()):
                if g >= 0:
                    out.setdefault(g, []).append(k)
        return out

    assert by_group(b) == by_group(a)  # the same groups, each whole and in its own order: chosen first
    assert all(mb["tokens"].shape == (3, 16) for mb in b) and len(b) < len(a) * 2
    for mb in b:  # the rows really hold several sequences, placed longest first
        assert (mb["segment_ids"] >= 0).sum() == mb["seq_lengths"].sum()


# ---------------------------------------------------------------- TRL formats, roles, rewards, encodings

def _jsonl(tmp_path, rows, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


USER = {"role": "user", "content": "What color is the sky?"}
SYSTEM = {"role": "system", "content": "Be brief."}


def _assistant(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("row, prompt", [
    # standard, explicit prompt
    ({"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."}, [USER]),
    # standard, implicit prompt: the shared leading text (TRL's extract_prompt; the space goes to the answers)
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, [{"role": "user", "content": "The sky is"}]),
    # conversational, explicit prompt (the form that was refused)
    ({"prompt": [USER], "chosen": [_assistant("Blue.")], "rejected": [_assistant("Green.")]}, [USER]),
    # conversational, implicit prompt, with a system turn
    ({"chosen": [SYSTEM, USER, _assistant("Blue.")], "rejected": [SYSTEM, USER, _assistant("Green.")]},
     [SYSTEM, USER]),
    # multi-turn explicit prompt
    ({"prompt": [SYSTEM, USER, _assistant("Which sky?"), {"role": "user", "content": "Ours."}],
      "chosen": [_assistant("Blue.")], "rejected": [_assistant("Green.")]},
     [SYSTEM, USER, _assistant("Which sky?"), {"role": "user", "content": "Ours."}]),
    # ultrafeedback_binarized: a string prompt and whole conversations that agree with it
    ({"prompt": "What color is the sky?", "chosen": [USER, _assistant("Blue.")],
      "rejected": [USER, _assistant("Green.")], "score_chosen": 8.0, "score_rejected": 2.0}, [USER]),
])
def test_every_trl_preference_form_loads(tmp_path, tok, row, prompt):
    (ex,) = read_examples(_jsonl(tmp_path, [row]))
    assert ex.kind == "pair" and ex.prompt == prompt
    assert [y.strip() for y in ex.responses] in (["Blue.", "Green."], ["blue.", "green."])
    groups, report = tokenize_examples([ex], tok, max_length=256, min_responses=2)
    assert report.groups_kept == 1 and len(groups[0].responses) == 2  # our rules apply: t0, length, counts


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "What is 2+2?", "chosen": [USER, _assistant("Blue.")], "rejected": [USER, _assistant("Green.")]},
     "chosen", "differs from 'prompt'"),
    ({"chosen": [USER, _assistant("Blue.")], "rejected": [{"role": "user", "content": "Other"}, _assistant("No.")]},
     "rejected", "differs from 'chosen'"),
    ({"chosen": [_assistant("Blue.")], "rejected": [_assistant("Green.")]}, "prompt", "explicit 'prompt'"),
    ({"chosen": "Blue.", "rejected": "Green."}, "prompt", "share no leading text"),
    ({"prompt": "q", "chosen": [_assistant("Blue."), {"role": "user", "content": "more?"}],
      "rejected": [_assistant("Green.")]}, "chosen", "goes on after its last assistant turn"),
    ({"prompt": [USER], "chosen": [{"role": "wizard", "content": "Blue."}], "rejected": [_assistant("Green.")]},
     "chosen[0].role", "'wizard' is not one the chat template accepts"),
])
def test_trl_rows_that_disagree_name_the_field(tmp_path, row, field, message):
    with pytest.raises(DataError) as info:
        read_examples(_jsonl(tmp_path, [row]))
    assert info.value.field == field and message in str(info.value), str(info.value)


def test_unpaired_rows_become_groups_with_rewards_one_and_zero(tmp_path, tok):
    rows = [{"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": [{"role": "user", "content": "Two plus two?"}], "completion": [_assistant("Four.")],
             "label": True},
            {"prompt": "The sky is", "completion": " green.", "label": False},
            {"prompt": "The sky is", "completion": " clear.", "label": True},
            {"prompt": "Two plus two?", "completion": "Five.", "label": True}]
    ex = read_examples(_jsonl(tmp_path, rows))
    assert [(e.where, e.responses, e.rewards) for e in ex] == [
        ("line 1", [" blue.", " green.", " clear."], [1.0, 0.0, 1.0]),
        ("line 2", ["Four.", "Five."], [1.0, 1.0])]  # one prompt, one label: rewards all equal
    # pointwise (RAO) keeps the one-label prompt; pairwise losses drop it and count it
    assert tokenize_examples(ex, tok, max_length=256)[1].groups_kept == 2
    _, report = tokenize_examples(ex, tok, max_length=256, min_responses=2, drop_tied=True)
    assert report.groups_kept == 1 and report.dropped["group_tied_rewards"] == 1
    with pytest.raises(DataError, match=r"line 1: field 'label': expected true or false"):
        read_examples(_jsonl(tmp_path, [{"prompt": "p", "completion": "c", "label": "yes"}], "bad.jsonl"))


def test_prompt_completion_is_sft_and_prompt_only_rows_say_where_they_go(tmp_path):
    (ex,) = read_examples(_jsonl(tmp_path, [{"prompt": [USER], "completion": [_assistant("Blue.")]}]))
    assert ex.kind == "sft" and ex.prompt == [USER] and ex.responses == ["Blue."]
    with pytest.raises(DataError, match=r"line 1: prompt-only rows .*rao_megatron.cli.generate"):
        read_examples(_jsonl(tmp_path, [{"prompt": "The sky is"}], "p.jsonl"))


def test_roles_are_the_chat_templates(tmp_path, tok):
    from rao_megatron.data.tokenizer import template_roles

    assert template_roles(tok) == {"system", "user", "assistant"}  # ChatML pastes any role: the standard three
    d = tmp_path / "tok_tool"
    build_tiny_tokenizer(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ 'T: ' + m['content'] }}"
                            "{% elif m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% else %}"
                            "{{ m['role'] + ': ' + m['content'] }}{% endif %}{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tool_tok = load_tokenizer(d)
    assert template_roles(tool_tok) == {"user", "assistant", "tool"}  # named: tool; raises on system
    row = {"messages": [SYSTEM, USER, _assistant("Blue.")]}
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.role': role 'system' is not one the chat template"):
        read_examples(_jsonl(tmp_path, [row]), roles=template_roles(tool_tok))
    # a template refusing a prompt it was given anyway names the row instead of a jinja traceback
    (ex,) = read_examples(_jsonl(tmp_path, [row], "ok.jsonl"))
    with pytest.raises(DataError, match=r"ok\.jsonl: line 1: field 'prompt': the chat template refuses it"):
        tokenize_examples([ex], tool_tok, max_length=64, source=str(tmp_path / "ok.jsonl"))


@pytest.mark.parametrize("value, message", [
    ("1" + "0" * 400, "integer of about 401 digits"),
    ("1e300", "|reward| must be at most 1e+06, got 1e+300"),
    ("-2e6", "|reward| must be at most 1e+06, got -2e+06"),
    ("1e999", "expected a finite number, got inf"),
])
def test_rewards_are_finite_and_bounded(tmp_path, value, message):
    p = tmp_path / "r.jsonl"
    p.write_text('{"prompt": "p", "responses": ["a", "b"], "rewards": [0.5, 1]}\n'
                 f'{{"prompt": "p", "responses": ["a", "b"], "rewards": [0.5, {value}]}}\n')
    with pytest.raises(DataError) as info:
        read_examples(p)
    assert info.value.where == "line 2" and info.value.field == "rewards[1]" and message in str(info.value)
    ok = _jsonl(tmp_path, [{"prompt": "p", "responses": ["a"], "rewards": [-1e6]}], "ok.jsonl")
    assert read_examples(ok)[0].rewards == [-1e6]  # the bound itself is accepted


@pytest.mark.parametrize("content, where, message", [
    (b'{"prompt": "p", "responses": ["a"]}\n\xff\xfebinary\n', "line 2", "not UTF-8 text (byte 0xff"),
    ('{"prompt": "p", "responses": ["a"]}\n'.encode("utf-16"), None, "UTF-16 text"),
    ('{"prompt": "p", "responses": ["a"]}\n'.encode("utf-16-le"), "line 1", "NUL byte"),
    (b'{"prompt": "p", "responses": ["a"]}\n' + b"[" * 200_000 + b"\n", "line 2", "nested too deeply"),
    (b'{"prompt": "p", "responses": ["a"], "rewards": [' + b"9" * 5000 + b"]}\n", "line 1", "invalid JSON"),
])
def test_unreadable_files_name_the_file_and_line(tmp_path, content, where, message):
    p = tmp_path / "enc.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_examples(p)
    assert info.value.where == where and message in str(info.value) and str(p) in str(info.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "responses": ["a"]}\n')
    assert read_examples(p)[0].responses == ["a"]


def test_drop_tied_for_any_loss_and_refused_where_pairs_need_it(tmp_path):
    from rao_megatron.config import ConfigError, load_config
    from rao_megatron.data.tokenizer import load_tokenizer
    from rao_megatron.losses import get_loss
    from rao_megatron.training.run_data import load_groups

    # ultrafeedback_binarized.jsonl: two groups, one of them tied (the test above)
    def kept(loss: str, *extra: str) -> tuple[list[int], dict]:
        cfg = load_config(None, [f"loss.name={loss}", f"data.train_path={DATA / 'ultrafeedback_binarized.jsonl'}",
                                 "data.eval_fraction=0", f"data.token_cache={tmp_path / 'tokens'}", *extra])
        loaded = load_groups(cfg, load_tokenizer(None), get_loss(loss))
        return [g.row for g in loaded.train], loaded.report.dropped

    assert kept("rao")[0] == [1, 2]                          # RAO trains on tied groups by default
    rows, dropped = kept("rao", "data.drop_tied=true")       # ... or drops them, counted, like DPO
    assert rows == [1] and dropped["group_tied_rewards"] == 1
    assert kept("dpo")[0] == [1] == kept("dpo", "data.drop_tied=true")[0]
    with pytest.raises(ConfigError, match="'data.drop_tied'.*trains on pairs"):
        kept("dpo", "data.drop_tied=false")


def test_shared_prompt_batches_hold_the_same_sequences_in_fewer_slots():
    """GroupBatcher with ``shared_prompt``: every step holds the same sequences, each with the
    same per-sequence columns, as one prompt per response; each group of two or more responses is one unit
    (its prompt once) in rows of the fewest multiples of seq_length that hold the largest group; a
    single-response group is not shared."""
    from rao_megatron.data.tokenize import TokenizedGroup

    rng = random.Random(3)

    def group(i: int, k: int, prompt: int) -> TokenizedGroup:
        return TokenizedGroup(group_id=i, prompt_ids=[1] + [rng.randrange(3, 50) for _ in range(prompt - 1)],
                              responses=[[rng.randrange(3, 50) for _ in range(rng.randrange(1, 5))] for _ in range(k)],
                              rewards=[float(j) for j in range(k)], is_reference=None, row=i)

    groups = [group(i, 4, 9) for i in range(6)] + [group(6, 1, 9), group(7, 4, 12)]
    kw = dict(seq_length=16, pad_id=0, groups_per_micro_batch=2, global_batch_groups=8, seed=5, packing=True,
              packed_rows=4)
    plain, shared = GroupBatcher(groups, **kw), GroupBatcher(groups, **kw, shared_prompt=True)
    # the largest group: a 12-token prompt + 4 responses of 1-4 tokens, 16-28 tokens -> rows of 32, 2 per
    # micro-batch (the same 64 slots)
    assert shared.row_tokens == 32 and shared.rows == 2 and plain.row_tokens == 16 and plain.rows == 4
    a, b = plain.next_step(), shared.next_step()
    for key in ("group_ids", "lengths", "seq_lengths", "rewards", "seq_keys"):
        got = sorted(zip(*(torch.cat([mb[k] for mb in b]).tolist() for k in ("seq_keys", key))))
        want = sorted(zip(*(torch.cat([mb[k] for mb in a]).tolist() for k in ("seq_keys", key))))
        assert got == want, key
    units = sum(mb["shared_prompts"] for mb in b)
    expect = sum(shared._is_shared(g) for g in groups)
    assert units == expect == 7  # every group of 4; never the single response
    assert not shared._is_shared(groups[6])
    filled = [sum(int((mb["segment_ids"] >= 0).sum()) for mb in x) for x in (a, b)]
    tokens = sum(int(mb["seq_lengths"].sum()) for mb in a)
    assert filled[0] == tokens and filled[1] == tokens - sum(
        len(g.prompt_ids) * (len(g.responses) - 1) for g in groups if shared._is_shared(g))


def test_shared_prompt_unset_takes_the_layout_that_costs_less():
    """``shared_prompt=None``: long prompts with short answers share them; short prompts with long answers,
    where a shared unit would only need longer rows for the same slots, keep one prompt per response."""
    from rao_megatron.data.tokenize import TokenizedGroup

    def groups(prompt: int, answer: int, k: int) -> list[TokenizedGroup]:
        return [TokenizedGroup(group_id=i, prompt_ids=[1] + [7] * (prompt - 1), responses=[[8 + j] * answer
                                                                                          for j in range(k)],
                               rewards=[float(j) for j in range(k)], is_reference=None, row=i) for i in range(16)]

    kw = dict(seq_length=32, pad_id=0, groups_per_micro_batch=2, global_batch_groups=4, packing=True,
              layout_hidden=64)
    long_prompts = GroupBatcher(groups(24, 4, 4), shared_prompt=None, **kw)  # 4 x 28 tokens, or 24 + 16 = 40
    assert long_prompts.shared_prompt and long_prompts.row_tokens % 32 == 0 and long_prompts.row_tokens >= 64
    short_prompts = GroupBatcher(groups(2, 30, 2), shared_prompt=None, **kw)  # 2 x 32 tokens, or 2 + 60 = 62
    assert not short_prompts.shared_prompt and short_prompts.row_tokens == 32
    assert "not used" in short_prompts.layout_line()
    # told to share, it shares: in the shortest rows that hold a group (one row of 64, 4 per micro-batch of 8 x 32)
    forced = GroupBatcher(groups(2, 30, 2), shared_prompt=True, **kw)
    assert forced.shared_prompt and forced.row_tokens == 64
    assert GroupBatcher(groups(24, 4, 4), shared_prompt=False, **kw).shared_prompt is False
