"""The joint support: which tokens every model allows, and each model's log-probs restricted to them.

A token that ANY model gives -inf (masked: grammar constraints, banned ids, padding) is masked in the fusion. Every
model is renormalised on the joint support before any arithmetic, so the KL terms of DLF stay finite, and masked
entries are zero-filled before differences are taken, so inf - inf (NaN) never happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def check_matrix(field: str, x: object) -> torch.Tensor:
    """A floating [B, V] tensor with V >= 1, or a ValueError naming `field`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{field}: must be a torch.Tensor of shape [B, V], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{field}: must have shape [B, V] with V >= 1, got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{field}: must be a floating tensor, got dtype {x.dtype}")
    return x


def compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    """fp32 unless an input is fp64 (tests use fp64 for tight comparisons)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _log_probs(field: str, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log_softmax in `dtype`; NaN comes out exactly when a row holds NaN or +inf or masks every token."""
    lp = torch.log_softmax(z.to(dtype), dim=-1)  # [B, V]
    if bool(torch.isnan(lp).any()):  # one cheap check on the good path; the precise reason only on the bad one
        bad = torch.isnan(z) | (z == float("inf"))  # [B, V]
        if bool(bad.any()):
            row = int(bad.any(dim=-1).nonzero()[0, 0])
            raise ValueError(f"{field}: row {row} holds NaN or +inf; logits must be finite, or -inf for a masked token")
        row = int(torch.isnan(lp).any(dim=-1).nonzero()[0, 0])
        raise ValueError(f"{field}: row {row} masks every token (all -inf)")
    return lp


def check_logits(logits: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """{name: [B, V]} for every named model: present, floating, 2-D, one shape and one device. O(models), no pass
    over the values (the NaN guard is the caller's: joint_log_probs, or the fast path's row max and min)."""
    if not names:
        raise ValueError("names: at least one model is needed")
    missing = [n for n in names if n not in logits]
    if missing:
        raise ValueError(f"logits: missing model {missing[0]!r} (given: {sorted(logits)}, needed: {list(names)})")
    mats = {n: check_matrix(f"logits[{n!r}]", logits[n]) for n in names}
    first = names[0]
    for n in names[1:]:
        if mats[n].shape != mats[first].shape:
            raise ValueError(
                f"logits[{n!r}]: shape {list(mats[n].shape)} differs from logits[{first!r}] "
                f"shape {list(mats[first].shape)}; every model must give [B, V] over the same vocabulary"
            )
        if mats[n].device != mats[first].device:
            raise ValueError(f"logits[{n!r}]: on {mats[n].device}, logits[{first!r}] on {mats[first].device}")
    return mats


def joint_log_probs(
    logits: Mapping[str, torch.Tensor], names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each named model's log-probs on the joint support, and the joint mask.

    Returns ({name: [B, V] log-probs, -inf where masked, each row summing to 1 on the support}, mask [B, V] bool).
    Raises ValueError for a missing model, mismatched shapes, NaN/+inf logits, or a row where no token survives.
    """
    mats = check_logits(logits, names)
    first = names[0]
    dtype = compute_dtype(*mats.values())
    lp = {n: _log_probs(f"logits[{n!r}]", mats[n], dtype) for n in names}
    mask = torch.zeros_like(lp[first], dtype=torch.bool)  # [B, V]
    for x in lp.values():
        mask |= torch.isneginf(x)
    if not bool(mask.any()):
        return lp, mask  # nothing masked anywhere (the common case): every model is already normalised
    dead = mask.all(dim=-1)  # [B]
    if bool(dead.any()):
        row = int(dead.nonzero()[0, 0])
        raise ValueError(
            f"logits: row {row} has no token allowed by every model of {list(names)} (the models' masks cover the "
            "whole vocabulary)"
        )
    return {n: restrict(x, mask) for n, x in lp.items()}, mask


def restrict(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Renormalise [B, V] log-probs on the tokens where mask is False; -inf elsewhere."""
    return torch.log_softmax(logprobs.masked_fill(mask, float("-inf")), dim=-1)  # [B, V]


def zero_filled(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs with masked entries set to 0, safe for differences and weighted sums."""
    return logprobs.masked_fill(mask, 0.0)  # [B, V]
