"""Routed fusion: several experts, no task label; each request picks its experts by its own prompt.

Scoring experts by how much better each explains the prompt than the small base (docs/algorithms.md §6) fails on
the zoo: that signal drowns (the experts were tuned with loss on the answer only, and their modelling of the prompt's
format words drifted by several nats), so the representation used here is the one that separates the tasks:

    r(x)        = mean over the prompt's positions of the routing model's last hidden state        # [H]
    c           = mean over experts of the mean of r over that expert's example prompts            # [H] the centre
    sim_t(x)    = max over expert t's examples e of cos(r(x) - c, r(e) - c)                        # [T]
    w(x)        = softmax over the top_k experts of sim / tau (0 elsewhere);  w = 0 ("none") when max_t sim_t is
                  below min_similarity: the large base decodes alone, so an unseen task is not pushed off course.

Centring removes the large component every prompt shares (uncentred cosines all sit above 0.9); without it the
threshold has no room. The routed mixture delta Delta_w = sum_t w_t (l_Et - l_S) is then one expert for an inner
recipe: DLF solves one alpha per row and step for it (targets from the w-mixture Q_w = softmax(l_S + Delta_w)), or
static alphas weight it (expert t gets alpha_t * w_t). The weights reported per step are the effective alpha_t * w_t.

Pure tensor math: the Decoder computes the representations through the runner contract (ExtendOp.features_tokens)
and hands the weights in.

Where this sits among routers: Twin-Merging also routes on hidden states, but with a trained MLP, and merges weights;
Arrow and LoraHub route among adapters (Arrow from the adapters' own singular vectors, LoraHub with few-shot
gradient-free search for composition weights); PackLLM weights models by the prompt's perplexity and
Branch-Train-Merge by the expert posterior from context likelihood, the family of the likelihood score, which on
the zoo routes 0/64 colour prompts right (its centred variant: 64/64/54/0 on capital/colour/year/add, and no "none";
bench/routing_variants.py). Here nothing is trained: a few example prompts per expert and one cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .dlf import prepare, solve_problem

MAX_EXAMPLES_PER_EXPERT = 64  # example prompts an expert may register
MAX_TAU = 10.0


@dataclass(frozen=True)
class Routing:
    """How a routed recipe weights its experts per request. ``examples[t]`` belongs to the recipe's t-th expert."""

    model: str  # the model whose prompt representation is compared (the small base: every routed recipe reads it)
    examples: tuple[tuple[tuple[int, ...], ...], ...] = field(repr=False)  # per expert: example prompts, token ids
    tau: float = 0.05  # softmax temperature over the similarities, in (0, 10]
    top_k: int = 1  # experts kept per request (the rest get weight 0); 0 keeps every expert
    min_similarity: float = 0.5  # below this best similarity the request is routed to "none", in [-1, 1]
    centre: bool = True  # subtract the mean example representation before the cosine (needs >= 2 experts)
    _hash: int = field(default=0, init=False, repr=False, compare=False)
    _examples_ok: bool = field(default=False, init=False, repr=False, compare=False)  # checked once (fuse checks
    # its recipe every step; the example prompts are hundreds of ids)

    def __post_init__(self) -> None:
        if isinstance(self.examples, list):
            object.__setattr__(self, "examples", tuple(self.examples))
        ex = self.examples
        if isinstance(ex, tuple):
            ex = tuple(tuple(tuple(p) for p in e) if isinstance(e, (list, tuple)) else e for e in ex)
            object.__setattr__(self, "examples", ex)
        object.__setattr__(self, "_hash", self._compute_hash())

    def _compute_hash(self) -> int:
        try:  # the Decoder hashes a request's recipe every step: hash the example prompts once
            return hash((self.model, self.examples, self.tau, self.top_k, self.min_similarity, self.centre))
        except TypeError:
            return 0  # unhashable fields: check_routing says which

    def __hash__(self) -> int:
        return self._hash

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_hash", "_ex_hash"):
            state.pop(k, None)  # str hashes differ between processes: recomputed on unpickling
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_hash", self._compute_hash())

    def table_key(self) -> tuple:
        """What the example table depends on (not tau, top_k nor the threshold: overriding those reuses it). The
        examples enter as their hash; a table found under a key is checked against them (RouteTables)."""
        return (self.model, self.centre, self._examples_hash)

    @property
    def _examples_hash(self) -> int:
        h = self.__dict__.get("_ex_hash")
        if h is None:
            h = hash(self.examples)
            object.__setattr__(self, "_ex_hash", h)
        return h

    def longest_example(self) -> int:
        """Tokens in the longest example prompt (the Decoder checks it against the routing model's limit)."""
        n = self.__dict__.get("_longest")
        if n is None:
            n = max(len(p) for prompts in self.examples for p in prompts)
            object.__setattr__(self, "_longest", n)
        return n


def check_routing(r: object, experts: tuple[str, ...], models: tuple[str, ...]) -> None:
    """Raise ValueError naming the first bad field of a recipe's ``route`` and its limit."""
    if not isinstance(r, Routing):
        raise ValueError(f"route={r!r}: must be a fusion.routing.Routing or None")
    if not isinstance(r.model, str) or r.model not in models:
        raise ValueError(f"route.model={r.model!r}: must be a model the recipe reads ({', '.join(models)})")
    if not experts:
        raise ValueError("experts=(): a routed recipe needs at least one expert")
    if not isinstance(r.examples, tuple) or len(r.examples) != len(experts):
        n = len(r.examples) if isinstance(r.examples, tuple) else r.examples
        raise ValueError(f"route.examples: needs one tuple of example prompts per expert ({len(experts)}), got {n}")
    if not r._examples_ok:  # a frozen object: its examples cannot change once checked
        _check_examples(r.examples, experts)
        object.__setattr__(r, "_examples_ok", True)
    if not (_real(r.tau) and 0.0 < r.tau <= MAX_TAU):
        raise ValueError(f"route.tau={r.tau!r}: must be finite and in (0, {MAX_TAU}]")
    if not (isinstance(r.top_k, int) and not isinstance(r.top_k, bool) and 0 <= r.top_k <= len(experts)):
        raise ValueError(f"route.top_k={r.top_k!r}: must be an integer in 0..{len(experts)} (0: every expert)")
    if not (_real(r.min_similarity) and -1.0 <= r.min_similarity <= 1.0):
        raise ValueError(f"route.min_similarity={r.min_similarity!r}: must be in [-1, 1]")
    if not isinstance(r.centre, bool):
        raise ValueError(f"route.centre={r.centre!r}: must be a bool")
    if r.centre and len(experts) < 2:
        raise ValueError("route.centre=True: needs at least 2 experts (one expert's examples have no common centre)")


def _check_examples(examples: tuple, experts: tuple[str, ...]) -> None:
    for t, prompts in enumerate(examples):
        if not isinstance(prompts, tuple) or not 1 <= len(prompts) <= MAX_EXAMPLES_PER_EXPERT:
            raise ValueError(
                f"route.examples[{t}] ({experts[t]}): must hold 1..{MAX_EXAMPLES_PER_EXPERT} example prompts"
            )
        for i, p in enumerate(prompts):
            ok = isinstance(p, tuple) and p and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)
            if not ok:
                raise ValueError(f"route.examples[{t}][{i}]: must be a non-empty tuple of token ids >= 0")


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------------------------------------------
# The routing table and the weights
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteTable:
    """Every expert's example representations, centred and normalised, ready for cosines.

    The routing math runs in numpy on fp64: it is a handful of [B, T * K] numbers per step, where torch's per-call
    overhead (several microseconds per op) would be most of the cost of routing a request.
    """

    centre: np.ndarray  # [H] (zeros when not centring)
    examples: np.ndarray  # [H, T * K] unit columns, expert t's in columns t*K .. t*K + K - 1 (K = the most
    # examples of any expert; an expert with fewer repeats its first one, which changes no maximum)
    num_experts: int  # T


def build_table(per_expert: list[torch.Tensor], centre: bool) -> RouteTable:
    """per_expert[t]: [K_t, H] representations of expert t's example prompts."""
    feats = [f.detach().cpu().double().numpy() for f in per_expert]  # fp64: the cosines near 1 need the digits
    c = np.mean([f.mean(0) for f in feats], axis=0) if centre else np.zeros_like(feats[0][0])  # [H]
    k = max(f.shape[0] for f in feats)
    padded = [np.concatenate([f, np.repeat(f[:1], k - f.shape[0], axis=0)]) for f in feats]  # T x [K, H]
    ex = np.concatenate(padded) - c  # [T * K, H]
    ex /= np.maximum(np.linalg.norm(ex, axis=1, keepdims=True), 1e-12)
    return RouteTable(centre=c, examples=np.ascontiguousarray(ex.T), num_experts=len(feats))


def _similarities(query: torch.Tensor, table: RouteTable) -> np.ndarray:
    q = query.detach().cpu().numpy().astype(np.float64) - table.centre  # [B, H]
    q /= np.sqrt((q * q).sum(axis=1, keepdims=True)) + 1e-300
    cos = q @ table.examples  # [B, T * K]
    return cos.reshape(q.shape[0], table.num_experts, -1).max(axis=-1)  # [B, T]


def _weights(sims: np.ndarray, tau: float, top_k: int, min_similarity: float) -> np.ndarray:
    B, T = sims.shape
    k = T if top_k == 0 else min(top_k, T)
    w = np.zeros_like(sims)
    if k == 1:  # the default: the best expert takes it all (argmax: the first on a tie, as the sort below)
        w[np.arange(B), sims.argmax(axis=1)] = 1.0
        w[sims.max(axis=1) < min_similarity] = 0.0
        return w
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [B, k] best first; ties keep expert order
    top = np.take_along_axis(sims, order, axis=1) / tau  # [B, k]
    e = np.exp(top - top[:, :1])  # the first is the largest
    np.put_along_axis(w, order, e / e.sum(axis=1, keepdims=True), axis=1)
    w[sims.max(axis=1) < min_similarity] = 0.0  # "none"
    return w


def similarities(query: torch.Tensor, table: RouteTable) -> torch.Tensor:
    """query: [B, H] prompt representations -> [B, T] fp64 best cosine to each expert's examples."""
    return torch.from_numpy(_similarities(query, table))


def route_weights(sims: torch.Tensor, tau: float, top_k: int, min_similarity: float) -> torch.Tensor:
    """sims: [B, T] -> fp32 weights [B, T]: softmax(sim / tau) over the top_k experts, rows of 0 for "none"."""
    return torch.from_numpy(_weights(sims.double().numpy(), tau, top_k, min_similarity)).float()


def route(query: torch.Tensor, table: RouteTable, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """query: [B, H] -> (weights [B, T] fp32, similarities [B, T] fp64)."""
    sims = _similarities(query, table)
    return torch.from_numpy(_weights(sims, r.tau, r.top_k, r.min_similarity)).float(), torch.from_numpy(sims)


# ----------------------------------------------------------------------------------------------------------------
# Fusion of the routed mixture
# ----------------------------------------------------------------------------------------------------------------


def check_weights(weights: object, B: int, T: int) -> tuple[torch.Tensor, list[int]]:
    """route_weights handed to fuse: [B, T], finite, each in [0, 1], each row summing to 0 ("none") or 1.
    Returns them as fp32 (on their device) and the experts some row routes to."""
    if not isinstance(weights, torch.Tensor) or weights.shape != (B, T):
        shape = list(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"route_weights: a routed recipe needs one weight per row and expert, shape [{B}, {T}], got {shape}")
    a = weights.detach().to("cpu", torch.float32).numpy()  # [B, T]: a few numbers, checked off the device
    if not np.all((a >= 0) & (a <= 1 + 1e-5)):  # NaN fails both comparisons
        raise ValueError("route_weights: every weight must be finite and in [0, 1]")
    sums = a.sum(axis=1)
    if not np.all((np.abs(sums - 1) < 1e-4) | (sums == 0)):
        raise ValueError("route_weights: each row must sum to 1 (routed) or be all 0 (none)")
    return weights.float(), np.flatnonzero(a.max(axis=0) > 0).tolist()


def routed_alphas(
    lp: dict[str, torch.Tensor],
    zero: dict[str, torch.Tensor],
    mask: torch.Tensor,
    recipe,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The effective per-expert alphas [B, T] of a routed recipe (and the DLF loss [B], None when static).

    lp: {model: [B, V]} log-probs on the joint support; zero: the same with masked entries 0; weights: [B, T].
    DLF: alpha [B, 1] solved for the mixture delta, reported as alpha * w. Static: recipe.alphas[t] * w_t.
    """
    B, T = mask.shape[0], len(recipe.experts)
    w, active = check_weights(weights, B, T)
    w = w.to(device=mask.device, dtype=lp[recipe.small].dtype)  # [B, T]
    if recipe.solver is None:
        fixed = torch.tensor(recipe.alphas, dtype=w.dtype, device=w.device)  # [T]
        return w * fixed, None
    small = zero[recipe.small]  # [B, V]
    delta_w = torch.zeros_like(small)  # [B, V]
    for t in active:
        delta_w = delta_w + w[:, t : t + 1] * (zero[recipe.experts[t]] - small)
    mix = torch.log_softmax((small + delta_w).masked_fill(mask, float("-inf")), dim=-1)  # [B, V] log Q_w
    pb = prepare(lp[recipe.anchor], lp[recipe.small], mix.unsqueeze(0), mask)
    alpha, loss = solve_problem(pb, recipe.solver, recipe.max_alpha)  # [B, 1], [B]
    return alpha * w, loss


def fuse_routed_fast(
    z: dict[str, torch.Tensor],
    recipe,
    weights: torch.Tensor,
    support: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """The routed step on raw logits (fuse's fast path): (log-probs [B, V], alphas [B, T], loss, support size), or
    None when a logit is not finite (then fuse's dense path decides and names the model).

    z: [B, V] logits per model. Every per-model normalisation is a per-row constant, so the deltas may be taken on
    max-centred logits. Static: log_softmax(z_L + sum_t alpha_t w_t (z_Et - z_S)). DLF: the routed mixture is one
    expert with logits z_S + sum_t w_t (z_Et - z_S) (its softmax is Q_w), solved on the certified candidate support
    like any single-expert DLF step.
    """
    from .candidates import fuse_dlf_fast, log_softmax_

    B, T = z[recipe.small].shape[0], len(recipe.experts)
    w, active = check_weights(weights, B, T)  # top-k routing leaves most columns empty: only the active ones
    names = [recipe.anchor, recipe.small, *(recipe.experts[t] for t in active)]
    maxes = {n: z[n].amax(-1) for n in names}  # [B] each; amax propagates NaN, +inf shows in it
    mins = [z[n].amin(-1) for n in names]  # -inf (a masked token) shows in the min
    if not all(bool(torch.isfinite(m).all()) for m in [*maxes.values(), *mins]):
        return None
    w = w.to(device=z[recipe.small].device, dtype=z[recipe.small].dtype)  # [B, T]
    c_s = z[recipe.small] - maxes[recipe.small].unsqueeze(-1)  # [B, V]
    if recipe.solver is None:
        eff = w * torch.tensor(recipe.alphas, dtype=w.dtype, device=w.device)  # [B, T]
        out = z[recipe.anchor] - maxes[recipe.anchor].unsqueeze(-1)  # [B, V]
        for t in active:
            e = recipe.experts[t]
            out.addcmul_(z[e] - maxes[e].unsqueeze(-1) - c_s, eff[:, t : t + 1])
        return log_softmax_(out, torch.empty_like(out)), eff, None, None
    mix = c_s.clone()  # [B, V] logits of Q_w, up to a row constant
    for t in active:
        e = recipe.experts[t]
        mix.addcmul_(z[e] - maxes[e].unsqueeze(-1) - c_s, w[:, t : t + 1])
    zz = {recipe.anchor: z[recipe.anchor], recipe.small: z[recipe.small], "\0mix": mix}
    out = fuse_dlf_fast(zz, recipe.anchor, recipe.small, ["\0mix"], recipe.solver, recipe.max_alpha, support, eps)
    if out is None:
        return None
    fused, step = out
    return fused, step.alphas * w, step.loss, step.support_size


__all__ = [
    "Routing",
    "RouteTable",
    "build_table",
    "check_routing",
    "route",
    "route_weights",
    "routed_alphas",
    "similarities",
]
