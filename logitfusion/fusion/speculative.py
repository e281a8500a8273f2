"""Speculative fused decoding, the acceptance rule (docs/algorithms.md §8).

The draft proposed y_1..y_k from q_1..q_k; the target (fused) distributions are p_1..p_{k+1}. Stochastic rule: accept
y_i with probability min(1, p_i(y_i) / q_i(y_i)); at the first rejection draw a replacement from
normalise(max(0, p_i - q_i)); if all k are accepted draw a bonus token from p_{k+1}. The emitted tokens are then
distributed exactly as non-speculative sampling from p. Greedy rule: accept while argmax p_i == y_i, then emit
argmax p_i (token-for-token identical to greedy decoding).
"""

from __future__ import annotations

import torch

from .sampling import draw, uniforms


def _check(p: object, q: object, drafted: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        shape = list(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ValueError(f"p: must be a tensor of shape [k+1, V], got {shape}")
    k, V = p.shape[0] - 1, p.shape[1]
    if not isinstance(q, torch.Tensor) or tuple(q.shape) != (k, V):
        shape = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: must have shape [k, V] = [{k}, {V}] (one row fewer than p), got {shape}")
    if not isinstance(drafted, torch.Tensor) or tuple(drafted.shape) != (k,):
        shape = list(drafted.shape) if isinstance(drafted, torch.Tensor) else type(drafted).__name__
        raise ValueError(f"drafted: must have shape [k] = [{k}], got {shape}")
    if drafted.is_floating_point() or drafted.is_complex() or drafted.dtype == torch.bool:
        raise ValueError(f"drafted: must hold integer token ids, got dtype {drafted.dtype}")
    if k and bool(((drafted < 0) | (drafted >= V)).any()):
        raise ValueError(f"drafted: token ids must be in [0, {V}), got {drafted.tolist()}")
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    p, q = p.to(dtype), q.to(device=p.device, dtype=dtype)
    for field, x in (("p", p), ("q", q)):
        if not bool((torch.isfinite(x) & (x >= 0)).all()):
            raise ValueError(f"{field}: probabilities must be finite and >= 0")
    for field, x in (("p", p), ("q", q)):
        if not bool((x.sum(-1) > 0).all()):
            raise ValueError(f"{field}: every row must have positive mass")
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)  # rounding of to_probs must not bias p/q
    return p, q, drafted.to(device=p.device, dtype=torch.long)


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, greedy: bool, generator: torch.Generator | None
) -> tuple[int, int]:
    """(n_accepted in 0..k, next_token): the replacement at the first rejection, or the bonus token from p[k].

    p: [k+1, V] target (fused, after to_probs) probabilities; q: [k, V] draft probabilities; drafted: [k] long.
    The stochastic rule always consumes k + 1 uniforms from `generator`, so a seeded request stays reproducible.
    """
    p, q, drafted = _check(p, q, drafted)
    k = drafted.shape[0]
    pos = torch.arange(k, device=p.device)  # [k]
    if greedy:
        target = p.argmax(-1)  # [k+1]
        accepted = target[:k] == drafted  # [k]
        n = int(accepted.to(torch.int64).cumprod(0).sum())
        return n, int(target[n])
    u = uniforms(generator, k + 1, p.device)  # [k+1]
    p_y, q_y = p[pos, drafted], q[pos, drafted]  # [k], [k]
    accepted = u[:k] * q_y < p_y  # [k]  u < p/q, written without dividing (q_y = 0 and p_y > 0 accepts)
    n = int(accepted.to(torch.int64).cumprod(0).sum())
    dist = p[n] if n == k else residual(p[n], q[n])  # [V]
    return n, int(draw(dist.unsqueeze(0), u[k : k + 1])[0])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalise(max(0, p - q)), or p itself when that is all zero (p <= q everywhere: only by rounding). [V] -> [V]"""
    r = (p - q).clamp_min(0.0)  # [V]
    total = r.sum()
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)
