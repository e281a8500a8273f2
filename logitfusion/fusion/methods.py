"""The recipe methods as ONE table: per method, the models it reads, how many experts it takes, which solvers and
which parameters it accepts, and how its named constructor (presets.<method>) is called.

Everything else derives from this table: the topology's RecipeSpec (its Literal types, its cross-field checks and
their messages, the role checks, building a preset into a Recipe), the gRPC and HTTP request fields, the CLI's
choices, the evaluation's solver sweep. Defaults live in one place only: the constructors' signatures in presets.py.

This module imports no torch, so the CLI can build its argument parser from it instantly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .recipe import Recipe

SOLVERS = ("grid", "newton", "joint")  # DLF solvers (dlf.py): the paper's grid, 1-D Newton per expert, joint Newton
SOLVING_OFF = "static"  # the request's solver value that turns solving off (fusion.proto RecipeSelection.solver)
MAX_EXPERTS = 64  # the most experts one recipe may fuse
MAX_ALPHA_LIMIT = 10.0  # no recipe may weight a delta more than this (max_alpha in (0, 10])
MAX_BETA = 10.0  # the largest EFT amplification a recipe accepts
ROUTE_FIELDS = ("inner", "tau", "top_k", "min_similarity")  # the parameters only a routed recipe takes
# Every parameter a preset or a request may set, besides the method (fusion.proto RecipeSelection without preset).
FIELDS = ("model", "experts", "alphas", "beta", "interp_lambda", "solver", *ROUTE_FIELDS, "max_alpha")


@dataclass(frozen=True)
class Choice:
    """A method's parameters by name, as a topology preset or a request sets them. None (or empty) leaves the
    constructor's default."""

    large: str | None = None  # the model with role large
    small: str | None = None  # the model with role small
    model: str | None = None  # single: the model; eft_down: the large fine-tuned model
    experts: tuple[str, ...] = ()
    alphas: tuple[float, ...] = ()
    beta: float | None = None
    interp_lambda: float | None = None
    solver: str | None = None
    inner: str | None = None
    tau: float | None = None
    top_k: int | None = None
    min_similarity: float | None = None
    max_alpha: float | None = None
    examples: tuple[tuple[tuple[int, ...], ...], ...] = ()  # routed: each expert's example prompts as token ids


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments that were set: None leaves the constructor's default."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _opt(values: tuple) -> list | None:
    return list(values) if values else None


@dataclass(frozen=True)
class MethodRule:
    """One recipe method: what it reads and takes, and how its constructor presets.<name> is called."""

    name: str
    description: str  # one line for listings (ListRecipes, /v1/models)
    args: Callable[[Choice], dict[str, Any]]  # the constructor's keyword arguments from a Choice
    reads: tuple[str, ...] = ("large", "small")  # base roles read besides the experts and the named model
    experts: tuple[int, int] = (0, 0)  # (fewest, most) experts
    model_role: str | None = None  # the role of the model it names ("any": any role); None: it names none
    solvers: tuple[str, ...] = ()  # DLF solvers it accepts; empty: its weights are fixed
    fixed_alphas: bool = False  # takes one fixed alpha per expert
    params: tuple[str, ...] = ()  # further parameters it takes
    required: tuple[str, ...] = ()  # parameters it cannot do without (besides a model_role's model)
    inner: tuple[str, ...] = ()  # routed: the methods that may fuse the routed experts (first: the default); their
    # rows say which solvers and alphas it takes
    route_examples: bool = False  # every expert needs example prompts (topology route_examples)
    solving_off: tuple[str, str] = ("method", SOLVING_OFF)  # the field and value that solver="static" stands for

    @property
    def constructor(self) -> Callable[..., Recipe]:
        """presets.<name>: imported on first use, so this table stays free of torch."""
        from . import presets  # noqa: PLC0415 (presets imports torch; the CLI reads this table without it)

        return getattr(presets, self.name)

    def build(self, choice: Choice) -> Recipe:
        """The validated Recipe of this method with the given parameters."""
        return self.constructor(**self.args(choice))

    def fusing(self, inner: str | None = None) -> MethodRule:
        """The row whose solver and alpha rules apply: the inner method's for routed, else this one."""
        return RULES[inner or self.inner[0]] if self.inner else self

    def takes(self, field: str, inner: str | None = None) -> bool:
        """Whether this method (with this inner method, for routed) takes the parameter ``field``."""
        if field == "alphas":
            return self.fusing(inner).fixed_alphas
        if field == "solver":
            return bool(self.fusing(inner).solvers)
        if field == "model":
            return self.model_role is not None
        return field in ("experts", "max_alpha") or field in self.params

    def needs(self, field: str) -> bool:
        """Whether a recipe of this method cannot do without the parameter ``field``."""
        return field in self.required or (field == "model" and self.model_role is not None)


_RULES = (
    MethodRule(
        "single", "one model alone",
        lambda c: {"model": c.model},
        reads=(), model_role="any",
    ),
    MethodRule(
        "proxy_tuning", "l_L + alpha (l_E - l_S) (proxy-tuning; alpha = 1 equals EFT up-scaling)",
        lambda c: _given(large=c.large, small=c.small, expert=c.experts[0], alpha=c.alphas[0] if c.alphas else None,
                         max_alpha=c.max_alpha),
        experts=(1, 1), fixed_alphas=True,
    ),
    MethodRule(
        "static", "l_L + sum_t alpha_t (l_Et - l_S) with fixed alphas",
        lambda c: _given(large=c.large, small=c.small, experts=list(c.experts), alphas=_opt(c.alphas),
                         max_alpha=c.max_alpha),
        experts=(1, MAX_EXPERTS), fixed_alphas=True,
    ),
    MethodRule(
        "eft_up", "l_E + beta (l_L - l_S) (emulated fine-tuning, up-scaling)",
        lambda c: _given(large=c.large, small=c.small, expert=c.experts[0], beta=c.beta),
        experts=(1, 1), params=("beta",),
    ),
    MethodRule(
        "eft_down", "l_S + (l_Lft - l_L) (emulated fine-tuning, down-scaling)",
        lambda c: {"small": c.small, "large": c.large, "large_ft": c.model},
        model_role="large_ft",
    ),
    MethodRule(
        "lambda_interp", "l_L + lambda (l_Ea - l_S) + (1 - lambda) (l_Eb - l_S)",
        lambda c: {"large": c.large, "small": c.small, "expert_a": c.experts[0], "expert_b": c.experts[1],
                   "lam": c.interp_lambda},
        experts=(2, 2), params=("interp_lambda",), required=("interp_lambda",),
    ),
    MethodRule(
        "dlf", "l_L + sum_t alpha_t (l_Et - l_S), alphas solved at every step (Dynamic Logit Fusion; solvers: "
        + ", ".join(SOLVERS) + ")",
        lambda c: _given(large=c.large, small=c.small, experts=list(c.experts), solver=c.solver,
                         max_alpha=c.max_alpha),
        experts=(1, MAX_EXPERTS), solvers=SOLVERS,
    ),
    MethodRule(
        "routed", "l_L + alpha sum_t w_t (l_Et - l_S): no task label; w from the prompt's similarity to each "
        "expert's example prompts (small base's mean last hidden state, centred cosine; softmax(sim / tau) over the "
        "top-k; none below min_similarity: the large base alone), alpha solved per step for the mixture (inner dlf) "
        "or fixed",
        lambda c: _given(large=c.large, small=c.small, experts=list(c.experts), examples=c.examples, inner=c.inner,
                         solver=c.solver, alphas=_opt(c.alphas), tau=c.tau, top_k=c.top_k,
                         min_similarity=c.min_similarity,
                         centre=len(c.experts) >= 2,  # one expert's examples have no common centre to subtract
                         max_alpha=c.max_alpha),
        experts=(1, MAX_EXPERTS), params=ROUTE_FIELDS, inner=("dlf", "static"), route_examples=True,
        solving_off=("inner", "static"),
    ),
)
RULES: Mapping[str, MethodRule] = {r.name: r for r in _RULES}
METHODS = tuple(RULES)  # every method name, in the table's order
INNER_METHODS = RULES["routed"].inner  # the methods a routed recipe may fuse its experts with


def _join(names: list[str], last: str = "and") -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def takers(field: str) -> str:
    """Which methods take ``field``, for error messages: 'only method dlf (or routed with inner dlf) solves weights'."""
    plain: list[str] = []  # methods that take it (routed: whatever its inner method)
    inner: list[str] = []  # "routed with inner dlf": taken only with that inner method
    for r in _RULES:
        if not r.inner or all(r.takes(field, i) for i in r.inner):
            plain += [r.name] if r.takes(field) else []
        else:
            inner += [f"{r.name} with inner {i}" for i in r.inner if r.takes(field, i)]
    several = len(plain) > 1
    out = f"only method{'s' if several else ''} {_join(plain)}" + (f" (or {_join(inner, 'or')})" if inner else "")
    verb, what = _VERBS.get(field, ("take", "it"))
    return f"{out} {verb}{'' if several else 's'} {what}"


_VERBS = {"solver": ("solve", "weights"), "alphas": ("take", "fixed alphas"), "model": ("name", "a model")}


def rule(method: str) -> MethodRule:
    """The table's row of ``method``; a ValueError naming the methods there are."""
    if method not in RULES:
        raise ValueError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    return RULES[method]


__all__ = ["Choice", "MethodRule", "RULES", "METHODS", "INNER_METHODS", "SOLVERS", "SOLVING_OFF", "FIELDS", "rule",
           "takers"]
