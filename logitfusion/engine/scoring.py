"""Scoring a token sequence under the FUSED distribution: the log-prob of every token given the ones before it.

This is what an OpenAI-style ``echo`` with ``logprobs`` returns (lm-evaluation-harness's loglikelihood tasks read
it): each model extends the whole sequence with ``want="all"``, every position is fused (DLF solves its weights at
each position, exactly as a decoding step would from the same logits), and the log-prob of the next token is read
off the fused row. Pure tensor code; the Coordinator runs the model calls.

    fused = fuse({m: logits_m}, recipe)                  # logits_m: [n, V] of tokens t_0 .. t_{n-1}
    scores = score_tokens(fused.logprobs, token_ids, top_n=5)
    scores.token_logprobs[i]   # log p(t_{i+1} | t_0..t_i), i = 0 .. n-2
    scores.top[i]              # the top_n (token id, log-prob) of row i (row n-1: the next token after the sequence)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceScores:
    """The fused log-probs of a sequence t_0 .. t_{n-1}."""

    token_ids: tuple[int, ...]  # t_0 .. t_{n-1}
    token_logprobs: tuple[float, ...]  # n - 1 values: log p_fused(t_{i+1} | t_0 .. t_i)
    top: tuple[tuple[tuple[int, float], ...], ...]  # n rows: the top_n (id, log-prob) after t_0 .. t_i, best first
    alphas: tuple[tuple[float, ...], ...]  # n rows: the expert weights solved at each position ([n, T])


def score_tokens(
    logprobs: torch.Tensor, token_ids: Sequence[int], top_n: int, alphas: torch.Tensor | None = None
) -> SequenceScores:
    """Fused log-probs ``[n, V]`` of a sequence (row i: the distribution after t_0..t_i) -> its SequenceScores."""
    n = len(token_ids)
    if logprobs.dim() != 2 or logprobs.shape[0] != n:
        raise ValueError(f"logprobs has shape {tuple(logprobs.shape)}, expected [{n}, V] for {n} tokens")
    if top_n < 0:
        raise ValueError(f"top_n={top_n} must be >= 0")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)  # [n]
    nxt = logprobs[:-1].gather(1, ids[1:, None]).squeeze(1) if n > 1 else logprobs.new_zeros(0)  # [n - 1]
    k = min(top_n, logprobs.shape[1])
    top_lp, top_id = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())  # [n, k]
    top = tuple(
        tuple(zip(row_ids, row_lp, strict=True)) for row_ids, row_lp in zip(top_id.tolist(), top_lp.tolist())
    )
    al = tuple(tuple(r) for r in alphas.tolist()) if alphas is not None else tuple(() for _ in range(n))
    return SequenceScores(tuple(int(t) for t in token_ids), tuple(nxt.tolist()), top, al)
