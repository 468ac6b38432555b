"""Tokenizer loading (local directories only) and the tiny byte-level ChatML tokenizer shipped for tests."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

#: the committed tiny tokenizer; regenerate with ``python -m rao_megatron.data.tokenizer``
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "tiny_tokenizer"

TINY_SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A few frequent English merges so that token boundaries differ from bytes, as with a real BPE
# (response tokens joined at the token level then differ from re-tokenizing the joined string).
_TINY_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n"),
                ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("Ġ", "i"), ("o", "u"), ("Ġ", "w"),
                ("i", "s"), ("Ġ", "c"), ("e", "s"), ("in", "g"), ("Ġ", "o"), ("Ġ", "p"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def build_tiny_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write the tiny tokenizer (256 byte tokens, a few merges, 3 specials, ChatML) to ``out_dir``.

    Token id ``b`` is byte ``b``, so tests can read ids directly. The files are written by hand (not
    ``save_pretrained``) so they load with any transformers version and are byte-identical per build.
    """
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in _TINY_MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_TINY_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


#: the roles every chat template is probed for; others count when the template names them (tool, ipython)
STANDARD_ROLES = ("system", "user", "assistant")
_PROBE = "\u2063PROBE\u2063"
# `message['role'] == 'tool'`, `m.role != "ipython"`, `'tool' == message['role']`
_NAMED_ROLE = re.compile(r"""role['"]?\]?\s*[!=]=\s*['"]([A-Za-z_][\w-]*)['"]"""
                         r"""|['"]([A-Za-z_][\w-]*)['"]\s*[!=]=\s*\w+(?:\[['"]role['"]\]|\.role)""")


def template_roles(tokenizer: PreTrainedTokenizerBase) -> frozenset[str]:
    """Message roles the tokenizer's chat template accepts.

    A standard role (system / user / assistant) counts when a probe turn of it renders without an error
    and keeps its content (a template that raises on, or silently drops, a system turn does not accept
    it); any other role counts when the template names it in a comparison (``== 'tool'``). A template
    that pastes any role into its markup (ChatML) therefore accepts the standard three only: an unknown
    role such as ``wizard`` would train on text the model never saw in that position.
    """
    template = tokenizer.chat_template
    text = template if isinstance(template, str) else json.dumps(template)
    named = {a or b for a, b in _NAMED_ROLE.findall(text or "")}
    probes = {"system": [{"role": "system", "content": _PROBE}, {"role": "user", "content": "u"}],
              "user": [{"role": "user", "content": _PROBE}],
              "assistant": [{"role": "user", "content": "u"}, {"role": "assistant", "content": _PROBE}]}
    accepted = set(named - set(STANDARD_ROLES))
    for role, messages in probes.items():
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may raise on a role it refuses (jinja's raise_exception)
            continue
        if isinstance(rendered, str) and _PROBE in rendered:
            accepted.add(role)
    return frozenset(accepted)


def load_tokenizer(path: str | os.PathLike[str] | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer with a chat template from a local directory; ``None`` gives the tiny tokenizer.

    Never downloads. A tokenizer without a pad token gets ``pad = eos``: pad positions are masked out
    of every loss, so the id only has to be valid.
    """
    directory = TINY_TOKENIZER_DIR if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory '{directory}' does not exist: pass a local directory holding tokenizer.json "
            "and tokenizer_config.json (e.g. the HF checkpoint dir; save it there with "
            "`AutoTokenizer.from_pretrained(name).save_pretrained(dir)` on a machine with hub access)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:  # a ValueError: a user error, one line (no tokenizer files, damaged ones)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load a tokenizer from '{directory}': {first}") from None
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer at '{directory}' has no chat template: use the instruct/chat model's tokenizer, or set "
            "`tokenizer.chat_template = ...` and `save_pretrained` it into that directory")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer at '{directory}' has neither a pad nor an eos token; set a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerBase, default: int | None = None) -> int:
    """The id padding positions hold: the pad token, else eos, else ``default``.

    Pad positions are masked out of every loss and attention, so the id only has to be valid
    (:func:`load_tokenizer` already sets ``pad = eos`` where a tokenizer has no pad token).
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    if default is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set a pad token")
    return default


if __name__ == "__main__":
    print(build_tiny_tokenizer(TINY_TOKENIZER_DIR))
