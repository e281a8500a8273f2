"""Recipes (which models a fusion reads, with which weights) and fuse(): one decoding step of fusion on [B, V].

Every method of docs/algorithms.md §2 and §3 is one formula over log-probs:

    fused = sum_m coeffs[m] * l_m  +  sum_t alpha_t * (l_{experts[t]} - l_{small})

with fixed alphas (static: proxy-tuning, DExperts, lambda interpolation), no deltas at all (EFT, whose weights sit
in coeffs), or alphas solved per row and step (DLF). Named constructors live in presets.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .candidates import (
    DEFAULT_EPS,
    check_support,
    fuse_dlf_fast,
    static_log_probs,
)
from .dlf import SOLVERS, check_max_alpha, check_solver, prepare, solve_problem
from .routing import Routing, check_routing, fuse_routed_fast, routed_alphas
from .support import check_logits, compute_dtype, joint_log_probs, zero_filled


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_name(x: object) -> bool:
    return isinstance(x, str) and x != ""


@dataclass(frozen=True)
class Recipe:
    """fused = sum_m coeffs[m] * l_m  +  sum_t alpha_t * (l_{experts[t]} - l_{small})"""

    name: str  # preset name or "custom"
    coeffs: tuple[tuple[str, float], ...]  # fixed linear part, e.g. (("large", 1.0),); weights any finite real
    experts: tuple[str, ...] = ()  # expert model names of the delta terms, in order
    small: str | None = None  # small base subtracted in each delta (required if experts)
    alphas: tuple[float, ...] = ()  # static alpha per expert (used when solver is None), each in [0, max_alpha]
    solver: str | None = None  # None (static) | "grid" | "newton" | "joint": DLF, alphas solved per row and step
    anchor: str | None = None  # DLF: the large base whose distribution is P (coeffs must be exactly ((anchor, 1.0),))
    max_alpha: float = 2.0  # upper bound of every alpha, static or solved; in (0, 10]
    method: str = "custom"  # recipe family (presets.METHODS), for listings; does not change the math
    route: Routing | None = None  # routed: per-row expert weights from the prompt (fusion.routing); the solver, if
    # any, solves ONE alpha per row for the routed mixture delta, and static alphas are scaled by the weights

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so a recipe stays hashable.
        for field in ("coeffs", "experts", "alphas"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        if isinstance(self.coeffs, tuple):
            fixed = tuple(tuple(c) if isinstance(c, list) else c for c in self.coeffs)
            object.__setattr__(self, "coeffs", fixed)

    def model_names(self) -> tuple[str, ...]:
        """Every model this recipe reads, sorted."""
        names = {n for n, _ in self.coeffs} | set(self.experts)
        if self.experts and self.small is not None:
            names.add(self.small)
        return tuple(sorted(names))

    @property
    def validated(self) -> bool:
        """True once validate() passed: the recipe is frozen, so it stays valid and is never checked again."""
        return self.__dict__.get("_validated", False)

    def validate(self) -> Recipe:
        """Raise ValueError naming the first bad field and its limit; else return this recipe, now trusted.

        The edges validate once (presets, the topology, Decoder.add_request); fuse() and the solvers trust a
        validated recipe and check only an unvalidated one. dataclasses.replace() gives an unvalidated copy.
        """
        if self.validated:
            return self
        if not _is_name(self.name):
            raise ValueError(f"name={self.name!r}: must be a non-empty string")
        if not _is_name(self.method):
            raise ValueError(f"method={self.method!r}: must be a non-empty string")
        check_max_alpha(self.max_alpha)
        _check_coeffs(self.coeffs)
        _check_experts(self.experts, self.small)
        _check_alphas(self.alphas, self.experts, self.solver, self.max_alpha)
        _check_solver_fields(self)
        if self.route is not None:
            check_routing(self.route, self.experts, self.model_names())
        object.__setattr__(self, "_validated", True)  # not a field: equality, hashing and repr ignore it
        return self

    def named(self, name: str) -> Recipe:
        """This recipe under another name (a topology preset's), as trusted as this one: a name changes no math."""
        if not _is_name(name):
            raise ValueError(f"name={name!r}: must be a non-empty string")
        copy = replace(self, name=name)
        if self.validated:
            object.__setattr__(copy, "_validated", True)
        return copy


def _check_coeffs(coeffs: object) -> None:
    if not isinstance(coeffs, tuple) or not coeffs:
        raise ValueError(f"coeffs={coeffs!r}: must be a non-empty tuple of (model name, weight) pairs")
    seen: set[str] = set()
    for i, c in enumerate(coeffs):
        if not (isinstance(c, tuple) and len(c) == 2 and _is_name(c[0]) and _is_real(c[1])):
            raise ValueError(f"coeffs[{i}]={c!r}: must be a (model name, weight) pair")
        if not math.isfinite(c[1]):
            raise ValueError(f"coeffs[{i}]={c!r}: weight must be finite")
        if c[0] in seen:
            raise ValueError(f"coeffs[{i}]={c!r}: model {c[0]!r} appears twice")
        seen.add(c[0])


def _check_experts(experts: object, small: object) -> None:
    if not isinstance(experts, tuple):
        raise ValueError(f"experts={experts!r}: must be a tuple of model names")
    for i, e in enumerate(experts):
        if not _is_name(e):
            raise ValueError(f"experts[{i}]={e!r}: must be a non-empty string")
        if e in experts[:i]:
            raise ValueError(f"experts[{i}]={e!r}: named twice")
    if small is not None and not _is_name(small):
        raise ValueError(f"small={small!r}: must be a non-empty string or None")
    if experts and small is None:
        raise ValueError("small=None: required when experts is not empty (each delta is l_expert - l_small)")
    if small in experts:
        raise ValueError(f"small={small!r}: must not also be an expert")


def _check_alphas(alphas: object, experts: tuple, solver: object, max_alpha: float) -> None:
    if not isinstance(alphas, tuple):
        raise ValueError(f"alphas={alphas!r}: must be a tuple of floats")
    if solver is None and len(alphas) != len(experts):
        raise ValueError(
            f"alphas={alphas!r}: has {len(alphas)} entries for {len(experts)} experts; give one alpha per expert"
        )
    if solver is not None and len(alphas) not in (0, len(experts)):
        raise ValueError(f"alphas={alphas!r}: a DLF recipe solves its alphas; give none or one per expert")
    for i, a in enumerate(alphas):
        if not (_is_real(a) and math.isfinite(a) and 0.0 <= a <= max_alpha):
            raise ValueError(f"alphas[{i}]={a!r}: must be finite and in [0, max_alpha={max_alpha}]")


def _check_solver_fields(r: Recipe) -> None:
    if r.solver is not None:
        check_solver(r.solver)
        if not r.experts:
            raise ValueError(f"experts=(): solver={r.solver!r} needs at least one expert")
        if r.anchor is None:
            raise ValueError(f"anchor=None: required when solver={r.solver!r} (the large base whose distribution is P)")
    if r.anchor is None:
        return
    if not _is_name(r.anchor):
        raise ValueError(f"anchor={r.anchor!r}: must be a non-empty string or None")
    if dict(r.coeffs).get(r.anchor) != 1.0:
        raise ValueError(f"anchor={r.anchor!r}: must be in coeffs with weight 1.0, got coeffs={r.coeffs!r}")
    if r.solver is not None and len(r.coeffs) != 1:
        raise ValueError(
            f"coeffs={r.coeffs!r}: a DLF recipe fuses exactly anchor + deltas, so coeffs must be "
            f"(({r.anchor!r}, 1.0),)"
        )


@dataclass
class FusionResult:
    """One fused step for every row of the batch."""

    logprobs: torch.Tensor  # [B, V] fused, renormalised log-probs; -inf where any read model masks the token
    alphas: torch.Tensor  # [B, T] weight used per expert (static or solved); [B, 0] without experts
    loss: torch.Tensor | None  # [B] DLF objective at the chosen alphas; None for static recipes
    support_size: torch.Tensor | None = None  # [B] tokens the DLF solve ran on (V: dense); None for static recipes


def fuse(
    logits: Mapping[str, torch.Tensor],
    recipe: Recipe,
    route_weights: torch.Tensor | None = None,
    *,
    support: str = "auto",
    eps: float = DEFAULT_EPS,
) -> FusionResult:
    """Fuse one step. logits[name]: [B, V] raw logits or log-probs of every model the recipe reads.

    route_weights: [B, T] expert weights of each row, required by (and only used for) a routed recipe.
    The recipe is checked only if it was never validated (presets and the Decoder's add_request validate once);
    the logits are always checked. support: "auto" solves DLF on the certified candidate support where it pays
    (docs/algorithms.md §4, at most eps of the mass dropped), "candidates" always does, "dense" is the reference path
    on the whole vocabulary. Logits with a masked (-inf) token always take the dense path.
    """
    if not recipe.validated:
        recipe.validate()
    support, eps = check_support(support, eps)
    if support != "dense":
        fast = _fuse_fast(logits, recipe, support, eps, route_weights)
        if fast is not None:
            return fast
    return fuse_dense(logits, recipe, route_weights)


def _static_weights(recipe: Recipe) -> dict[str, float]:
    """The total coefficient of each model read: sum_m coeffs[m] l_m + sum_t alpha_t (l_{E_t} - l_S)."""
    weights = {n: 0.0 for n in recipe.model_names()}
    for name, weight in recipe.coeffs:
        weights[name] += weight
    for e, a in zip(recipe.experts, recipe.alphas):
        weights[e] += a
        weights[recipe.small] -= a  # type: ignore[index]
    return weights


def _fuse_fast(
    logits: Mapping[str, torch.Tensor],
    recipe: Recipe,
    support: str,
    eps: float,
    route_weights: torch.Tensor | None = None,
) -> FusionResult | None:
    """One pass over the logits (static), plus the DLF solve on the candidate support. None: take the dense path
    (a masked token, NaN or +inf somewhere)."""
    names = recipe.model_names()
    mats = check_logits(logits, names)
    dtype = compute_dtype(*mats.values())
    z = {n: x.to(dtype) for n, x in mats.items()}  # no copy when already fp32 / fp64
    B, T = z[names[0]].shape[0], len(recipe.experts)
    if B == 0:
        return None  # an empty batch: the dense path returns the empty result
    if recipe.route is not None:
        routed = fuse_routed_fast(z, recipe, route_weights, support, eps)
        return None if routed is None else FusionResult(*routed)
    if not (T and recipe.solver is not None):
        fused = static_log_probs(z, _static_weights(recipe))
        if fused is None:
            return None
        alphas = torch.tensor(recipe.alphas, dtype=dtype, device=fused.device).expand(B, T)  # [B, T]
        return FusionResult(fused, alphas.contiguous(), None)
    out = fuse_dlf_fast(z, recipe.anchor, recipe.small, recipe.experts, recipe.solver,  # type: ignore[arg-type]
                        recipe.max_alpha, support, eps)
    if out is None:
        return None
    fused, step = out
    return FusionResult(fused, step.alphas, step.loss, step.support_size)


def fuse_dense(
    logits: Mapping[str, torch.Tensor], recipe: Recipe, route_weights: torch.Tensor | None = None
) -> FusionResult:
    """The reference path: every model normalised on the joint support, DLF solved on the whole vocabulary.
    Handles masked tokens and raises the precise error for bad logits. The recipe must be valid. route_weights: as
    for fuse (routed recipes only)."""
    lp, mask = joint_log_probs(logits, recipe.model_names())  # {name: [B, V]}, [B, V]
    B = mask.shape[0]
    T = len(recipe.experts)
    any_masked = bool(mask.any())
    zero = {n: zero_filled(x, mask) if any_masked else x for n, x in lp.items()}  # masked entries 0: no inf - inf
    loss = None
    support_size = None
    if recipe.route is not None:
        alphas, loss = routed_alphas(lp, zero, mask, recipe, route_weights)  # [B, T], [B] or None
        if loss is not None:
            support_size = (~mask).sum(-1)
    elif T and recipe.solver is not None:
        experts = torch.stack([lp[e] for e in recipe.experts])  # [T, B, V]
        pb = prepare(lp[recipe.anchor], lp[recipe.small], experts, mask)
        alphas, loss = solve_problem(pb, recipe.solver, recipe.max_alpha)  # [B, T], [B]
        support_size = (~mask).sum(-1)
    else:
        dtype = next(iter(lp.values())).dtype
        alphas = torch.tensor(recipe.alphas, dtype=dtype, device=mask.device).expand(B, T)  # [B, T]
    scores = torch.zeros_like(zero[recipe.model_names()[0]])  # [B, V]
    for name, weight in recipe.coeffs:
        scores = scores + weight * zero[name]
    for t, e in enumerate(recipe.experts):
        scores = scores + alphas[:, t : t + 1] * (zero[e] - zero[recipe.small])
    fused = torch.log_softmax(scores.masked_fill(mask, float("-inf")) if any_masked else scores, dim=-1)  # [B, V]
    return FusionResult(logprobs=fused, alphas=alphas.contiguous(), loss=loss, support_size=support_size)


__all__ = ["Recipe", "FusionResult", "fuse", "fuse_dense", "SOLVERS"]
