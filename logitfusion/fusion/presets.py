"""Named recipes: one constructor per method of docs/algorithms.md §2 and §3 (the rows of methods.RULES, which say
what each method reads and takes). Each returns a validated, trusted Recipe (fuse never checks it again).

    single         l_M
    proxy_tuning   l_L + alpha (l_E - l_S)                               (alpha = 1: proxy-tuning = EFT up-scaling)
    static         l_L + sum_t alpha_t (l_{E_t} - l_S)                   (DExperts-style, fixed alphas)
    eft_up         l_E + beta (l_L - l_S)                                (beta = 1: plain EFT up-scaling)
    eft_down       l_S + (l_Lft - l_L)
    lambda_interp  l_L + lam (l_Ea - l_S) + (1 - lam) (l_Eb - l_S)
    dlf            l_L + sum_t alpha_t (l_{E_t} - l_S), alphas solved per row and step
    routed         l_L + alpha sum_t w_t (l_{E_t} - l_S), w from the prompt (routing.py), alpha solved (DLF) or fixed
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

from .methods import INNER_METHODS, MAX_BETA, METHODS, RULES, rule
from .recipe import Recipe
from .routing import Routing


def _real_in(field: str, x: object, lo: float, hi: float) -> float:
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi
    if not ok:
        raise ValueError(f"{field}={x!r}: must be finite and in [{lo}, {hi}]")
    return float(x)


def _names(field: str, x: str | Sequence[str]) -> tuple[str, ...]:
    names = (x,) if isinstance(x, str) else tuple(x) if isinstance(x, (list, tuple)) else None
    if not names:
        raise ValueError(f"{field}={x!r}: must be a model name or a non-empty sequence of model names")
    return names


def _done(recipe: Recipe) -> Recipe:
    return recipe.validate()


def single(model: str) -> Recipe:
    """One model alone (the large base, an expert, or the large fine-tuned upper bound)."""
    return _done(Recipe(name="single", method="single", coeffs=((model, 1.0),)))


def proxy_tuning(large: str, small: str, expert: str, alpha: float = 1.0, max_alpha: float = 2.0) -> Recipe:
    """l_L + alpha (l_E - l_S)."""
    return _done(
        Recipe(
            name="proxy_tuning",
            method="proxy_tuning",
            coeffs=((large, 1.0),),
            experts=(expert,),
            small=small,
            alphas=(alpha,),
            anchor=large,
            max_alpha=max_alpha,
        )
    )


def static(
    large: str, small: str, experts: str | Sequence[str], alphas: Sequence[float] | None = None, max_alpha: float = 2.0
) -> Recipe:
    """l_L + sum_t alpha_t (l_{E_t} - l_S) with fixed alphas (default 1.0 each)."""
    names = _names("experts", experts)
    weights = (1.0,) * len(names) if alphas is None else tuple(alphas)
    return _done(
        Recipe(
            name="static",
            method="static",
            coeffs=((large, 1.0),),
            experts=names,
            small=small,
            alphas=weights,
            anchor=large,
            max_alpha=max_alpha,
        )
    )


def eft_up(large: str, small: str, expert: str, beta: float = 1.0) -> Recipe:
    """EFT up-scaling l_E + beta (l_L - l_S): beta scales the large-minus-small base delta, not the expert's."""
    beta = _real_in("beta", beta, 0.0, MAX_BETA)
    coeffs = ((expert, 1.0), (large, beta), (small, -beta))
    return _done(Recipe(name="eft_up", method="eft_up", coeffs=coeffs))


def eft_down(small: str, large: str, large_ft: str) -> Recipe:
    """EFT down-scaling l_S + (l_Lft - l_L): the small base fine-tuned by the large pair's delta."""
    return _done(Recipe(name="eft_down", method="eft_down", coeffs=((small, 1.0), (large_ft, 1.0), (large, -1.0))))


def lambda_interp(large: str, small: str, expert_a: str, expert_b: str, lam: float) -> Recipe:
    """l_L + lam (l_Ea - l_S) + (1 - lam) (l_Eb - l_S), lam in [0, 1]."""
    lam = _real_in("lam", lam, 0.0, 1.0)
    return _done(
        Recipe(
            name="lambda_interp",
            method="lambda_interp",
            coeffs=((large, 1.0),),
            experts=(expert_a, expert_b),
            small=small,
            alphas=(lam, 1.0 - lam),
            anchor=large,
        )
    )


def dlf(large: str, small: str, experts: str | Sequence[str], solver: str = "newton", max_alpha: float = 2.0) -> Recipe:
    """Dynamic Logit Fusion: alphas solved per row and step by `solver` (grid, newton or joint) in [0, max_alpha]."""
    return _done(
        Recipe(
            name="dlf",
            method="dlf",
            coeffs=((large, 1.0),),
            experts=_names("experts", experts),
            small=small,
            solver=solver,
            anchor=large,
            max_alpha=max_alpha,
        )
    )


def routed(
    large: str,
    small: str,
    experts: str | Sequence[str],
    examples: Sequence[Sequence[Sequence[int]]],
    *,
    inner: str = "dlf",
    solver: str = "newton",
    alphas: Sequence[float] | None = None,
    tau: float = 0.05,
    top_k: int = 1,
    min_similarity: float = 0.5,
    centre: bool = True,
    max_alpha: float = 2.0,
) -> Recipe:
    """Routed fusion: each request weights the experts by its prompt's similarity to their ``examples`` (token
    ids, one list of prompts per expert), then fuses the routed mixture with the ``inner`` recipe: "dlf" (one alpha
    solved per step by ``solver``) or "static" (``alphas``, default 1.0 each, scaled by the weights)."""
    names = _names("experts", experts)
    if inner not in INNER_METHODS:
        raise ValueError(f"inner={inner!r}: must be {' or '.join(map(repr, INNER_METHODS))}")
    route = Routing(
        model=small,
        examples=tuple(tuple(tuple(int(x) for x in p) for p in e) for e in examples),
        tau=tau,
        top_k=top_k,
        min_similarity=min_similarity,
        centre=centre,
    )
    static_alphas = (1.0,) * len(names) if alphas is None else tuple(alphas)
    return _done(
        Recipe(
            name="routed",
            method="routed",
            coeffs=((large, 1.0),),
            experts=names,
            small=small,
            alphas=() if inner == "dlf" else static_alphas,
            solver=solver if inner == "dlf" else None,
            anchor=large,
            max_alpha=max_alpha,
            route=route,
        )
    )


PRESETS: dict[str, Callable[..., Recipe]] = {name: globals()[name] for name in METHODS}  # each row's constructor
DESCRIPTIONS: dict[str, str] = {name: r.description for name, r in RULES.items()}


def build(method: str, **kwargs: object) -> Recipe:
    """PRESETS[method](**kwargs) with a ValueError naming the method or the argument at fault."""
    ctor = rule(method).constructor
    params = inspect.signature(ctor).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an argument of preset {method!r} (takes {', '.join(params)})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ValueError(f"{missing[0]}: required by preset {method!r}")
    return ctor(**kwargs)
