"""Sampling on the fused distribution (docs/algorithms.md §7): greedy, temperature, top-k, top-p, seeded per row.

Every row draws its one uniform number from its own torch.Generator, and every other step is row-wise, so a seeded
request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .support import check_matrix


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens from the fused distribution."""

    temperature: float = 0.0  # softmax temperature, >= 0 and finite; 0 -> greedy
    top_k: int = 0  # keep the k most likely tokens; 0 -> off
    top_p: float = 1.0  # keep the smallest set of most likely tokens with mass >= top_p; in (0, 1], 1 -> off
    seed: int | None = None  # seed of this request's generator, in [0, 2**64 - 1]; None -> unseeded

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its limit."""
        t = self.temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature={t!r}: must be finite and >= 0 (0 means greedy)")
        k = self.top_k
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise ValueError(f"top_k={k!r}: must be an integer >= 0 (0 means off)")
        p = self.top_p
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"top_p={p!r}: must be in (0, 1] (1 means off)")
        s = self.seed
        if s is not None and not (isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED):
            raise ValueError(f"seed={s!r}: must be None or an integer in [0, 2**64 - 1]")


def make_generator(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded with params.seed, or None (the global RNG) for an unseeded request."""
    params.validate()
    if params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def _check_batch(logprobs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    x = check_matrix("logprobs", logprobs)
    if len(params) != x.shape[0]:
        raise ValueError(f"params: {len(params)} entries for a batch of {x.shape[0]} rows; give one per row")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}]: must be a SamplingParams, got {type(p).__name__}")
        try:
            p.validate()
        except ValueError as e:
            raise ValueError(f"params[{i}].{e}") from None
    x = x.float() if x.dtype != torch.float64 else x
    if bool((torch.isnan(x) | (x == float("inf"))).any()):
        raise ValueError("logprobs: holds NaN or +inf; log-probs must be finite, or -inf for a masked token")
    dead = torch.isneginf(x).all(-1)  # [B]
    if bool(dead.any()):
        raise ValueError(f"logprobs: row {int(dead.nonzero()[0, 0])} masks every token (all -inf)")
    return x


def _filter_sorted(sorted_p: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which positions of descending-sorted probs survive top-k then top-p. [B, V] -> [B, V] bool."""
    V = sorted_p.shape[-1]
    rank = torch.arange(V, device=sorted_p.device)  # [V]
    keep = rank < top_k.unsqueeze(-1)  # [B, V]  top-k (top_k = V when off)
    kept = sorted_p * keep  # [B, V]
    before = kept.cumsum(-1) - kept  # [B, V]  mass strictly before each position
    total = kept.sum(-1, keepdim=True)  # [B, 1]
    nucleus = (before < top_p.unsqueeze(-1) * total) | (top_p.unsqueeze(-1) >= 1)  # first token always kept
    return keep & nucleus


def _trusted(logprobs: torch.Tensor) -> torch.Tensor:
    """The unchecked path's only conversion: the dtype _check_batch would give."""
    return logprobs.float() if logprobs.dtype not in (torch.float32, torch.float64) else logprobs


def to_probs(logprobs: torch.Tensor, params: Sequence[SamplingParams], *, check: bool = True) -> torch.Tensor:
    """The distribution each row is actually sampled from: [B, V] log-probs -> [B, V] probs.

    Temperature, then top-k, then top-p, renormalised; one-hot argmax for greedy rows. Ties at the top-k / top-p
    boundary keep the lower token id. check=False skips the scan for NaN / +inf / dead rows and the params'
    validation: for callers that produced the log-probs themselves (fuse's output of checked logits) and validated
    the params at their edge.
    """
    x = _check_batch(logprobs, params) if check else _trusted(logprobs)  # [B, V]
    B, V = x.shape
    dev = x.device
    temp = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)  # [B]
    greedy = temp == 0  # [B]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=dev)  # [B]
    top_p = torch.tensor([p.top_p for p in params], dtype=x.dtype, device=dev)  # [B]
    probs = torch.softmax(x / torch.where(greedy, 1.0, temp).unsqueeze(-1), dim=-1)  # [B, V]
    if any(0 < p.top_k < V or p.top_p < 1 for p in params):
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, _filter_sorted(sorted_p, top_k, top_p))
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    if not any(p.greedy for p in params):
        return probs
    one_hot = torch.nn.functional.one_hot(x.argmax(-1), V).to(probs.dtype)  # [B, V]
    return torch.where(greedy.unsqueeze(-1), one_hot, probs)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, one token per row: probs [B, V], uniform [B] in [0, 1) -> [B] long.

    Picks the first token whose cumulative mass exceeds uniform * total, so a zero-probability token is never drawn.
    """
    cdf = probs.cumsum(-1)  # [B, V]
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [B]
    V = probs.shape[-1]
    last = V - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)  # [B] last token with mass (rounding guard)
    return torch.minimum(idx, last)


def uniforms(generator: torch.Generator | None, n: int, device: torch.device) -> torch.Tensor:
    """n uniform numbers in [0, 1) from `generator` (or the global RNG), moved to `device`. -> [n]"""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def sample(
    logprobs: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    check: bool = True,
) -> torch.Tensor:
    """One token per row: [B, V] log-probs -> [B] long. Greedy rows take the argmax and draw nothing.

    check=False: trusted log-probs and params (see to_probs); the shapes and generators are still checked (O(B)).
    """
    if len(generators) != len(params):
        raise ValueError(f"generators: {len(generators)} entries for a batch of {len(params)} rows; give one per row")
    for i, g in enumerate(generators):
        if g is not None and not isinstance(g, torch.Generator):
            raise ValueError(f"generators[{i}]: must be a torch.Generator or None, got {type(g).__name__}")
    if not check:
        x = check_matrix("logprobs", logprobs)
        if len(params) != x.shape[0]:
            raise ValueError(f"params: {len(params)} entries for a batch of {x.shape[0]} rows; give one per row")
    if all(p.greedy for p in params if isinstance(p, SamplingParams)):
        x = _check_batch(logprobs, params) if check else _trusted(logprobs)
        return x.argmax(-1)  # [B]  the common case: no softmax, no draw
    probs = to_probs(logprobs, params, check=check)  # [B, V]
    dev = probs.device
    u = [uniforms(g, 1, dev) if not p.greedy else torch.zeros(1, device=dev) for p, g in zip(params, generators)]
    tokens = draw(probs, torch.cat(u)) if u else torch.zeros(0, dtype=torch.long, device=dev)  # [B]
    greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=dev)  # [B]
    return torch.where(greedy, probs.argmax(-1), tokens)
