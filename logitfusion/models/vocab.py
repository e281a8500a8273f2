"""Vocabulary identity across models (docs/algorithms.md §9).

Fusion adds log-probabilities token by token, so every model must map ids to the same tokens. This module gives:
- ``vocab_fingerprint(tokenizer)``: sha256 over the id -> token map and the special tokens (strings and ids), cheap
  to send over the wire (``RunnerInfo.vocab_fingerprint``);
- ``check_vocabularies({name: tokenizer})``: raises ``VocabularyMismatch`` naming both models and the first
  differing id (or special token);
- ``shared_token_map(tok_a, tok_b)``: the overlap of two different vocabularies (token strings present in both), as
  index tensors, for fusing only on the intersection.

A tokenizer here is a transformers tokenizer (``get_vocab()``, ``len()``, ``bos_token``...) or a raw
``tokenizers.Tokenizer`` (no special-token roles then).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class VocabularyMismatch(ValueError):
    """Two models that must share a vocabulary do not."""


@dataclass(frozen=True)
class VocabView:
    """A tokenizer reduced to what identity depends on."""

    id_to_token: tuple[str | None, ...]  # index = id; None for an id no token maps to
    specials: tuple[tuple[str, str | None, int | None], ...]  # (role, token, id) for bos, eos, pad, unk


def vocab_view(tokenizer: Any) -> VocabView:
    """The id -> token list (covering every id below the tokenizer's size) and the special tokens."""
    try:
        vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)  # tokenizers.Tokenizer
    except TypeError:
        vocab = dict(tokenizer.get_vocab())  # transformers tokenizer (includes added tokens)
    size = max(len(tokenizer) if hasattr(tokenizer, "__len__") else 0, max(vocab.values(), default=-1) + 1)
    table: list[str | None] = [None] * size
    for token, idx in vocab.items():
        table[idx] = token
    specials = []
    for role in SPECIAL_ROLES:
        token = getattr(tokenizer, f"{role}_token", None)
        idx = getattr(tokenizer, f"{role}_token_id", None)
        specials.append((role, None if token is None else str(token), None if idx is None else int(idx)))
    return VocabView(id_to_token=tuple(table), specials=tuple(specials))


def vocab_fingerprint(tokenizer: Any) -> str:
    """sha256 hex of the id -> token map and the (role, token, id) special tokens."""
    view = vocab_view(tokenizer)
    body = json.dumps({"tokens": view.id_to_token, "specials": view.specials}, ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _first_difference(name_a: str, a: VocabView, name_b: str, b: VocabView) -> str | None:
    """A message describing the first difference between two views, or None if they are identical."""
    for idx in range(max(len(a.id_to_token), len(b.id_to_token))):
        ta = a.id_to_token[idx] if idx < len(a.id_to_token) else None
        tb = b.id_to_token[idx] if idx < len(b.id_to_token) else None
        if ta != tb:
            return (
                f"vocabulary mismatch between {name_a!r} ({len(a.id_to_token)} tokens) and {name_b!r} "
                f"({len(b.id_to_token)} tokens): first differing id {idx} is {_show(ta)} in {name_a!r} "
                f"but {_show(tb)} in {name_b!r}"
            )
    for (role, tok_a, id_a), (_, tok_b, id_b) in zip(a.specials, b.specials, strict=True):
        if (tok_a, id_a) != (tok_b, id_b):
            return (
                f"vocabulary mismatch between {name_a!r} and {name_b!r}: special token {role.upper()} is "
                f"{_show(tok_a)} (id {id_a}) in {name_a!r} but {_show(tok_b)} (id {id_b}) in {name_b!r}"
            )
    return None


def _show(token: str | None) -> str:
    return "<no token>" if token is None else repr(token)


def check_vocabularies(named_tokenizers: Mapping[str, Any]) -> None:
    """Raise ``VocabularyMismatch`` unless every tokenizer equals the first one (ids, tokens, special tokens)."""
    if not named_tokenizers:
        raise ValueError("check_vocabularies: no tokenizers given")
    items = list(named_tokenizers.items())
    ref_name, ref_tok = items[0]
    ref_view = vocab_view(ref_tok)
    ref_fp = vocab_fingerprint(ref_tok)
    for name, tok in items[1:]:
        if vocab_fingerprint(tok) == ref_fp:
            continue
        message = _first_difference(ref_name, ref_view, name, vocab_view(tok))
        if message is not None:
            raise VocabularyMismatch(message)


def shared_token_map(tok_a: Any, tok_b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token strings present in both vocabularies: (ids in a [K], ids in b [K]), sorted by the id in ``tok_a``.

    Strings are compared exactly (a "Ġthe" and a "▁the" are different strings). Raises ValueError when there is no
    overlap at all.
    """
    table_b = {tok: idx for idx, tok in enumerate(vocab_view(tok_b).id_to_token) if tok is not None}
    pairs = [
        (idx, table_b[tok]) for idx, tok in enumerate(vocab_view(tok_a).id_to_token) if tok is not None and tok in table_b
    ]
    if not pairs:
        raise ValueError("shared_token_map: the two vocabularies have no token string in common")
    ids_a = torch.tensor([a for a, _ in pairs], dtype=torch.long)  # [K]
    ids_b = torch.tensor([b for _, b in pairs], dtype=torch.long)  # [K]
    return ids_a, ids_b
