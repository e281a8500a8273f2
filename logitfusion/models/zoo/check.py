"""The zoo's own quality check: greedy (optionally fused) decoding and accuracy on its tasks.

This is deliberately simple (full recompute every step, no KV cache): it verifies that the zoo shows weak-to-strong
transfer independently of the project's engine, which is then evaluated against these same tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from logitfusion.models.zoo.tasks import normalize_answer
from logitfusion.models.zoo.tokenizer import EOS, PAD
from logitfusion.models.zoo.world import Item


@dataclass(frozen=True)
class Weighted:
    """One term of a static fusion: coefficient * log_softmax(model logits)."""

    model: torch.nn.Module
    coeff: float


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def fused_logprobs(terms: Sequence[Weighted], ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """sum_m c_m * log_softmax(z_m) at the last position, sliced to the real vocabulary: [B, V]."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    total = torch.zeros((ids.shape[0], vocab))
    for term in terms:
        logits = term.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # [B, T, Vpad]
        total += term.coeff * torch.log_softmax(logits[:, -1, :vocab].float(), dim=-1)
    return total


@torch.no_grad()
def greedy_answers(
    terms: Sequence[Weighted],
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 64,
) -> list[str]:
    """Greedy decode of each prompt under the fused distribution; text up to EOS (specials skipped)."""
    pad, eos = tokenizer.token_to_id(PAD), tokenizer.token_to_id(EOS)
    newline = tokenizer.token_to_id("\n")
    vocab = tokenizer.get_vocab_size()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [e.ids for e in tokenizer.encode_batch(list(prompts[start : start + batch_size]))]
        generated: list[list[int]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        for _ in range(max_new_tokens):
            ids, mask = _left_pad([s + g for s, g in zip(seqs, generated, strict=True)], pad)
            nxt = fused_logprobs(terms, ids, mask, vocab).argmax(-1).tolist()  # [B]
            for r, tok in enumerate(nxt):
                if done[r]:
                    continue
                if tok in (eos, newline):
                    done[r] = True
                else:
                    generated[r].append(tok)
            if all(done):
                break
        out.extend(tokenizer.decode(g, skip_special_tokens=True) for g in generated)
    return out


def accuracy(terms: Sequence[Weighted], tokenizer: Tokenizer, items: Sequence[Item], **kw: int) -> float:
    """Share of items whose greedy answer equals the reference after normalisation."""
    if not items:
        raise ValueError("accuracy: no items")
    answers = greedy_answers(terms, tokenizer, [it.prompt for it in items], **kw)
    hits = sum(normalize_answer(a) == normalize_answer(it.answer) for a, it in zip(answers, items, strict=True))
    return hits / len(items)


def probe_accuracy(model: torch.nn.Module, tokenizer: Tokenizer, items: Sequence[Item]) -> float:
    """Declarative probe: does greedy continuation of 'the capital of X is' start with the right value?"""
    if not items:
        raise ValueError("probe_accuracy: no items")
    n_tokens = max(len(tokenizer.encode(it.value, add_special_tokens=False).ids) for it in items)
    answers = greedy_answers([Weighted(model, 1.0)], tokenizer, [it.prompt for it in items], max_new_tokens=n_tokens)
    hits = 0
    for a, it in zip(answers, items, strict=True):
        ref = normalize_answer(it.value).split()
        hits += normalize_answer(a).split()[: len(ref)] == ref
    return hits / len(items)
