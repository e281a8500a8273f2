"""Dynamic Logit Fusion (docs/algorithms.md §3): the objective and its three solvers, batched over rows.

With P = softmax(l_L), Q = softmax(l_S), Q_t = softmax(l_{E_t}), Delta_t = l_{E_t} - l_S and s = sum_t alpha_t Delta_t,
the emulated fine-tuned large model is Pt = softmax(l_L + s) and the objective of one row is

    loss(alpha) = sum_t (KL(Pt || P) - KL(Q_t || Q))^2 + (KL(P || Pt) - KL(Q || Q_t))^2.

Pt is an exponential family in alpha. The deltas are stored centred under P (Delta_t - E_P[Delta_t]: a per-row
constant, which no softmax sees), so E_P[s] = 0 and with the log-partition g(alpha) = log E_P[exp(s)] both KLs are
    A = KL(Pt || P) = E_Pt[s] - g,        B = KL(P || Pt) = g,
and so are their derivatives (one expert: A' = alpha Var_Pt[Delta], A'' = Var_Pt[Delta] + alpha k3_Pt[Delta],
B' = E_Pt[Delta] - E_P[Delta], B'' = Var_Pt[Delta]; several: grad A_t = Cov_Pt(s, Delta_t), Hess B = Cov_Pt(Delta),
Hess A = Cov_Pt(Delta) + E_Pt[(s - E s)(Delta_t - E Delta_t)(Delta_r - E Delta_r)]).

Solvers (every one keeps the best point it evaluated, so none can end worse than where it started):
- grid:   the paper's. alpha_t on 0, 0.1, ..., max_alpha with all other alphas 0, full T-term loss; keep the single
          best (t, alpha). Vectorised over grid points, experts and rows.
- newton: the same one-expert-at-a-time family, solved continuously: per (t, row) a safeguarded Newton / bisection
          on loss'(alpha) inside one grid step of the best grid value (the one-expert loss can have several local
          minima when the targets are a few nats, so the grid's values seed it); keep the best t. Never above the
          grid's loss, never more than one grid step from its alpha.
- joint:  every alpha at once: projected Newton on [0, max_alpha]^T with a saddle-free (|eigenvalue|) Hessian,
          started from the newton solution; a candidate that does not lower the loss is pulled halfway back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .methods import MAX_ALPHA_LIMIT, SOLVERS
from .support import check_matrix, compute_dtype, restrict, zero_filled


GRID_STEP = 0.1  # the paper's grid: 0, 0.1, ..., max_alpha
NEWTON_ITERS = 5  # derivative evaluations per 1-D refinement inside one grid step of the best grid point
JOINT_ITERS = 6  # projected Newton evaluations after the newton start
_CHUNK_ELEMENTS = 1 << 21  # grid points evaluated at once are capped to about this many [.., V] elements


@dataclass(frozen=True)
class Problem:
    """One step's DLF problem on the joint support, prepared once and shared by every solver."""

    l_large: torch.Tensor  # [B, V] log P, -inf where masked
    deltas: torch.Tensor  # [T, B, V] l_{E_t} - l_S centred under P (E_P[delta_t] = 0); finite where masked
    a: torch.Tensor  # [B, T] targets KL(Q_t || Q)
    b: torch.Tensor  # [B, T] targets KL(Q || Q_t)
    lse0: torch.Tensor  # [B] logsumexp(l_large), ~0; subtracted so its rounding cancels in g

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, B, V)"""
        T, B, V = self.deltas.shape
        return T, B, V


@dataclass(frozen=True)
class Curve:
    """KL(Pt||P) = A, KL(P||Pt) = B and (optionally) their derivatives along one expert's alpha."""

    A: torch.Tensor
    B: torch.Tensor
    dA: torch.Tensor | None = None
    d2A: torch.Tensor | None = None
    dB: torch.Tensor | None = None
    d2B: torch.Tensor | None = None


def check_solver(solver: object) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: must be one of {', '.join(SOLVERS)}")
    return solver  # type: ignore[return-value]


def check_max_alpha(max_alpha: object) -> float:
    ok = isinstance(max_alpha, (int, float)) and not isinstance(max_alpha, bool)
    if not ok or not math.isfinite(max_alpha) or not 0.0 < max_alpha <= MAX_ALPHA_LIMIT:
        raise ValueError(f"max_alpha={max_alpha!r}: must be finite and in (0, {MAX_ALPHA_LIMIT}]")
    return float(max_alpha)


def grid_points(max_alpha: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0, 0.1, 0.2, ... up to max_alpha, plus max_alpha itself when it is off the grid."""
    n = int(math.floor(max_alpha / GRID_STEP + 1e-9))
    pts = [round(i * GRID_STEP, 10) for i in range(n + 1)]
    if max_alpha - pts[-1] > 1e-9:
        pts.append(max_alpha)
    return torch.tensor(pts, dtype=dtype, device=device)  # [G]


# ---------------------------------------------------------------------------------------------------------------
# Preparation


def prepare(l_large: torch.Tensor, l_small: torch.Tensor, l_experts: torch.Tensor, mask: torch.Tensor) -> Problem:
    """Targets and deltas from log-probs already restricted to the joint support (mask: [B, V], True = masked)."""
    # l_large, l_small: [B, V]; l_experts: [T, B, V]
    if bool(mask.any()):
        deltas = zero_filled(l_experts, mask) - zero_filled(l_small, mask)  # [T, B, V], 0 where masked
    else:
        deltas = l_experts - l_small  # [T, B, V], all finite
    a = (l_experts.exp() * deltas).sum(-1).clamp_min(0.0)  # [T, B]  KL(Q_t || Q)
    b = (-(l_small.exp() * deltas).sum(-1)).clamp_min(0.0)  # [T, B]  KL(Q || Q_t)
    m = (l_large.exp() * deltas).sum(-1, keepdim=True)  # [T, B, 1]  E_P[Delta_t]
    lse0, _ = _softmax_parts(l_large)  # [B], the same arithmetic as every later evaluation: g(0) is exactly 0
    return Problem(l_large, deltas.sub_(m), a.T.contiguous(), b.T.contiguous(), lse0)


def _stack_experts(l_experts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(l_experts, torch.Tensor):
        if l_experts.dim() != 3:
            raise ValueError(f"l_experts: must have shape [T, B, V], got {list(l_experts.shape)}")
        stacked = l_experts
    else:
        if len(l_experts) == 0:
            raise ValueError("l_experts: at least one expert is needed")
        mats = [check_matrix(f"l_experts[{i}]", x) for i, x in enumerate(l_experts)]
        if any(x.shape != mats[0].shape for x in mats):
            raise ValueError(f"l_experts: shapes differ: {[list(x.shape) for x in mats]}")
        stacked = torch.stack(mats)
    if stacked.shape[0] < 1:
        raise ValueError("l_experts: at least one expert is needed (T >= 1)")
    if not stacked.is_floating_point():
        raise ValueError(f"l_experts: must be a floating tensor, got dtype {stacked.dtype}")
    return stacked  # [T, B, V]


def problem_from_log_probs(
    l_large: torch.Tensor, l_small: torch.Tensor, l_experts: torch.Tensor | Sequence[torch.Tensor]
) -> Problem:
    """Validate shapes, restrict every model to the joint support, and prepare the DLF problem."""
    check_matrix("l_large", l_large)
    check_matrix("l_small", l_small)
    experts = _stack_experts(l_experts)
    if l_small.shape != l_large.shape or experts.shape[1:] != l_large.shape:
        raise ValueError(
            f"shapes differ: l_large {list(l_large.shape)}, l_small {list(l_small.shape)}, "
            f"l_experts {list(experts.shape)} (expected [B, V], [B, V], [T, B, V])"
        )
    dtype = compute_dtype(l_large, l_small, experts)
    l_large, l_small, experts = l_large.to(dtype), l_small.to(dtype), experts.to(dtype)
    for field, x in (("l_large", l_large), ("l_small", l_small), ("l_experts", experts)):
        if bool((torch.isnan(x) | (x == float("inf"))).any()):
            raise ValueError(f"{field}: holds NaN or +inf; log-probs must be finite, or -inf for a masked token")
    mask = torch.isneginf(l_large) | torch.isneginf(l_small) | torch.isneginf(experts).any(0)  # [B, V]
    if bool(mask.all(-1).any()):
        row = int(mask.all(-1).nonzero()[0, 0])
        raise ValueError(f"row {row}: no token is allowed by every model (the masks cover the whole vocabulary)")
    return prepare(restrict(l_large, mask), restrict(l_small, mask), restrict(experts, mask), mask)


# ---------------------------------------------------------------------------------------------------------------
# The objective


def _softmax_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp and softmax over the last dim, from one fused softmax. [..., V] -> ([...], [..., V]).

    softmax's largest entry is exactly 1 / sum(exp(x - max x)), so logsumexp = max x - log(max softmax).
    """
    pt = torch.softmax(x, dim=-1)  # [..., V]
    return x.amax(-1) - pt.amax(-1).log(), pt


def targets_loss(A: torch.Tensor, B: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t (A - a_t)^2 + (B - b_t)^2.  A, B: [..., B]; a, b: [B, T] -> [..., B]."""
    return ((A.unsqueeze(-1) - a).square() + (B.unsqueeze(-1) - b).square()).sum(-1)


def line_curve(pb: Problem, alpha: torch.Tensor, derivs: bool) -> Curve:
    """A, B (and derivatives in alpha) with ONE expert active: s = alpha * Delta_t.

    alpha: [..., T, B] (alpha[..., t, b] is expert t's weight in row b, every other expert at 0) -> fields [..., T, B].
    """
    x = torch.addcmul(pb.l_large, alpha.unsqueeze(-1), pb.deltas)  # [..., T, B, V]  log P + alpha Delta
    lse, pt = _softmax_parts(x)  # [..., T, B], [..., T, B, V]
    del x
    g = lse - pb.lse0  # [..., T, B]  log E_P[exp(alpha Delta)]
    if not derivs:
        mu = pt.mul_(pb.deltas).sum(-1)  # [..., T, B]  E_Pt[Delta]
        return Curve(A=(alpha * mu - g).clamp_min(0.0), B=g.clamp_min(0.0))
    mu = (pt * pb.deltas).sum(-1)  # [..., T, B]
    dc = pb.deltas - mu.unsqueeze(-1)  # [..., T, B, V]
    w = dc.square().mul_(pt)  # [..., T, B, V]
    var = w.sum(-1)  # [..., T, B]  Var_Pt[Delta]
    k3 = w.mul_(dc).sum(-1)  # [..., T, B]  third central moment
    A = (alpha * mu - g).clamp_min(0.0)
    return Curve(A, g.clamp_min(0.0), dA=alpha * var, d2A=var + alpha * k3, dB=mu, d2B=var)


# ---------------------------------------------------------------------------------------------------------------
# The line curves from binned moments (docs/algorithms.md §3, "Binned line curves")

BIN_RHO = 0.1  # max_alpha * (bin width) / 2: |alpha u| <= BIN_RHO for every token's offset u from its bin centre
BIN_ORDER = 5  # terms of exp(alpha u) kept: the truncation error is at most BIN_RHO^6 / 6! * e^(2 BIN_RHO) ~ 2e-9
_BIN_MOMENTS = BIN_ORDER + 4  # power sums S_0 .. S_{N+3}: the curve needs E[Delta^p exp(alpha Delta)] up to p = 3
_BIN_PAYS = 4  # binned when bins * moments * _BIN_PAYS <= V: each solver evaluation then costs O(bins), not O(V)


def truncation_bound(rho: float = BIN_RHO, order: int = BIN_ORDER) -> float:
    """Relative error bound of every binned sum E_P[Delta^p exp(alpha Delta)] (see BinnedLines)."""
    return rho ** (order + 1) / math.factorial(order + 1) * math.exp(2.0 * rho)


class BinnedLines:
    """line_curve(pb, alpha, derivs) for one expert at a time, from per-bin power sums instead of [.., V] passes.

    Along one expert's alpha the curve depends on the tokens only through the measure of Delta_t under P. Tokens
    are put in bins of width w = 2 BIN_RHO / max_alpha by their Delta (per expert and row); in bin k with centre c_k
    and offsets u = Delta - c_k (|u| <= w / 2), one pass keeps the power sums S_kj = sum_i P_i u_i^j, j <= N + 3.
    Then, with exp(alpha u) = sum_{n <= N} (alpha u)^n / n! + R and |R| <= BIN_RHO^(N+1) / (N+1)! e^BIN_RHO,

        Z_p(alpha) = sum_i P_i Delta_i^p e^(alpha Delta_i)
                   = sum_k e^(alpha c_k) sum_{n <= N} alpha^n / n! sum_{q <= p} C(p, q) c_k^(p-q) S_k,(q+n)

    to a relative error of at most truncation_bound() (~2e-9) for every alpha in [0, max_alpha], and g = log Z_0,
    E_Pt[Delta] = Z_1 / Z_0, Var and the third central moment from Z_2, Z_3: the same Curve as line_curve, at O(bins)
    per evaluation. The binning itself is one pass per moment over [T, B, V]; every grid point and Newton iterate
    after that is free of V.
    """

    def __init__(self, S: torch.Tensor, centre: torch.Tensor, dtype: torch.dtype) -> None:
        """From the per-bin power sums S [T, B, K, J] (float64, S[..., j] = sum P u^j, P normalised) and the bin
        centres [T, B, K] (float64, in the centred frame: E_P[Delta] = 0); dtype: of the curves returned."""
        T, B, bins, _ = S.shape
        # M[..., p, n] = sum_q C(p, q) c^(p-q) S_(q+n): Z_p's coefficient of alpha^n / n!
        N = BIN_ORDER + 1
        M = torch.zeros(T, B, bins, 4, N, dtype=torch.float64, device=S.device)
        for p in range(4):
            for q in range(p + 1):
                M[..., p, :] += math.comb(p, q) * centre.pow(p - q).unsqueeze(-1) * S[..., q : q + N]
        self.M = M  # [T, B, K, 4, N]
        self.centre = centre  # [T, B, K]
        self.empty = S[..., 0] <= 0  # [T, B, K] bins without mass
        self.log_z0 = S[..., 0].sum(-1).log()  # [T, B]  log sum P (~0)
        self.dtype = dtype
        self._fact = torch.tensor([math.factorial(n) for n in range(N)], dtype=torch.float64, device=S.device)

    @classmethod
    def from_problem(cls, pb: Problem, bins: int, lo: torch.Tensor, width: float) -> BinnedLines:
        """Bin a prepared problem's centred deltas (torch: one pass per moment over [T, B, V])."""
        T, B, V = pb.shape
        d = pb.deltas  # [T, B, V]
        idx = torch.sub(d, lo.unsqueeze(-1)).div_(width).floor_().clamp_(0, bins - 1)  # [T, B, V] bin (as float)
        u = d - (idx + 0.5).mul_(width).add_(lo.unsqueeze(-1))  # [T, B, V]  offset from the bin centre
        flat = idx.long().add_(torch.arange(T * B, device=d.device).view(T, B, 1) * bins).view(-1)  # [T*B*V]
        w = pb.l_large.exp().expand(T, B, V).contiguous()  # [T, B, V]  P_i u_i^j; P = 0 where masked
        sums = torch.zeros(_BIN_MOMENTS, T * B * bins, dtype=d.dtype, device=d.device)
        for j in range(_BIN_MOMENTS):
            sums[j].index_add_(0, flat, w.view(-1))
            if j + 1 < _BIN_MOMENTS:
                w.mul_(u)
        S = sums.double().view(_BIN_MOMENTS, T, B, bins).permute(1, 2, 3, 0)  # [T, B, K, J]
        centre = lo.double().unsqueeze(-1) + (torch.arange(bins, dtype=torch.float64, device=d.device) + 0.5) * width
        return cls(S, centre, pb.l_large.dtype)

    @staticmethod
    def bins_for(span: float, max_alpha: float) -> tuple[int, float]:
        """(bins, width) covering a delta span of `span` nats with bins of width 2 BIN_RHO / max_alpha."""
        width = 2.0 * BIN_RHO / max_alpha
        return int(math.floor(span / width)) + 1, width

    @staticmethod
    def pays(bins: int, vocab: int) -> bool:
        """Whether binned curves cost less than exact ones: enough tokens per bin."""
        return bins * _BIN_MOMENTS * _BIN_PAYS <= vocab

    @staticmethod
    def maybe(pb: Problem, max_alpha: float) -> BinnedLines | None:
        """The binned curves when they cost less than the dense ones (enough tokens per bin), else None."""
        T, B, V = pb.shape
        lo, hi = pb.deltas.amin(-1), pb.deltas.amax(-1)  # [T, B]
        bins, width = BinnedLines.bins_for(float((hi - lo).max()) if V else 0.0, max_alpha)
        if not BinnedLines.pays(bins, V):
            return None
        return BinnedLines.from_problem(pb, bins, lo, width)

    def __call__(self, alpha: torch.Tensor, derivs: bool) -> Curve:
        """As line_curve(pb, alpha, derivs): alpha [..., T, B] -> fields [..., T, B]."""
        a = alpha.double()
        powers = a.unsqueeze(-1).pow(torch.arange(self._fact.shape[0], device=a.device)) / self._fact  # [..., T, B, N]
        e = (a.unsqueeze(-1) * self.centre).masked_fill(self.empty, float("-inf"))  # [..., T, B, K]
        shift = e.amax(-1, keepdim=True)  # [..., T, B, 1]
        weights = torch.einsum("...tbk,tbkpn->...tbpn", (e - shift).exp(), self.M if derivs else self.M[..., :2, :])
        Z = (weights * powers.unsqueeze(-2)).sum(-1)  # [..., T, B, 4 (2 without derivs)]  Z_p e^(-shift)
        z0 = Z[..., 0]
        g = (z0.log() + shift.squeeze(-1) - self.log_z0).masked_fill(a == 0, 0.0)  # [..., T, B]; g(0) = 0
        mu = Z[..., 1] / z0
        A, Bk = (a * mu - g).clamp_min(0.0), g.clamp_min(0.0)
        dt = self.dtype
        if not derivs:
            return Curve(A=A.to(dt), B=Bk.to(dt))
        r2, r3 = Z[..., 2] / z0, Z[..., 3] / z0
        var = (r2 - mu.square()).clamp_min(0.0)
        k3 = r3 - 3.0 * mu * r2 + 2.0 * mu.pow(3)
        return Curve(A.to(dt), Bk.to(dt), dA=(a * var).to(dt), d2A=(var + a * k3).to(dt), dB=mu.to(dt),
                     d2B=var.to(dt))


@dataclass(frozen=True)
class Joint:
    """Loss and (optionally) its gradient and Hessian at a full alpha vector, per row."""

    loss: torch.Tensor  # [B]
    grad: torch.Tensor | None = None  # [B, T]
    hess: torch.Tensor | None = None  # [B, T, T]


def joint_terms(pb: Problem, alphas: torch.Tensor, derivs: bool) -> Joint:
    """The multi-expert loss at alphas [B, T] (every expert active), with gradient and Hessian if asked."""
    deltas = pb.deltas  # [T, B, V]
    s = torch.einsum("bt,tbv->bv", alphas, deltas)  # [B, V]
    lse, pt = _softmax_parts(pb.l_large + s)  # [B], [B, V]
    es = (pt * s).sum(-1)  # [B]  E_Pt[s]
    g = lse - pb.lse0  # [B]
    A, B = (es - g).clamp_min(0.0), g.clamp_min(0.0)  # [B]
    loss = targets_loss(A, B, pb.a, pb.b)  # [B]
    if not derivs:
        return Joint(loss)
    mu = torch.einsum("bv,tbv->bt", pt, deltas)  # [B, T]  E_Pt[Delta_t] (= grad B)
    dc = deltas - mu.T.unsqueeze(-1)  # [T, B, V]
    w = pt * dc  # [T, B, V]
    cov = torch.einsum("tbv,rbv->btr", w, dc)  # [B, T, T]  Cov_Pt(Delta_t, Delta_r)
    k3 = torch.einsum("tbv,rbv->btr", w.mul_(s - es.unsqueeze(-1)), dc)  # [B, T, T]
    grad_a = torch.einsum("btr,br->bt", cov, alphas)  # [B, T]  Cov_Pt(s, Delta_t)
    T = deltas.shape[0]
    ra = (T * A - pb.a.sum(-1))[:, None]  # [B, 1]  sum_t (A - a_t)
    rb = (T * B - pb.b.sum(-1))[:, None]
    grad = 2.0 * (ra * grad_a + rb * mu)  # [B, T]
    outer = grad_a.unsqueeze(-1) * grad_a.unsqueeze(-2) + mu.unsqueeze(-1) * mu.unsqueeze(-2)  # [B, T, T]
    hess = 2.0 * (T * outer + ra[..., None] * (cov + k3) + rb[..., None] * cov)  # [B, T, T]
    return Joint(loss, grad, hess)


def dlf_loss(
    l_large: torch.Tensor,
    l_small: torch.Tensor,
    l_experts: torch.Tensor | Sequence[torch.Tensor],
    alphas: torch.Tensor,
) -> torch.Tensor:
    """The multi-expert DLF objective (docs/algorithms.md §3) at alphas [B, T]; inputs are log-probs. Returns [B]."""
    pb = problem_from_log_probs(l_large, l_small, l_experts)
    T, B, _ = pb.shape
    if not isinstance(alphas, torch.Tensor) or alphas.shape != (B, T):
        shape = list(alphas.shape) if isinstance(alphas, torch.Tensor) else type(alphas).__name__
        raise ValueError(f"alphas: must be a tensor of shape [B, T] = [{B}, {T}], got {shape}")
    alphas = alphas.to(device=pb.l_large.device, dtype=pb.l_large.dtype)
    if not bool(torch.isfinite(alphas).all()):
        raise ValueError("alphas: must all be finite")
    return joint_terms(pb, alphas, derivs=False).loss


# ---------------------------------------------------------------------------------------------------------------
# Solvers


def _keep_better(best_x, best_l, x, loss):
    """Per-element: take (x, loss) where loss is strictly lower (ties keep the earlier, smaller alpha)."""
    better = loss < best_l
    return torch.where(better, x, best_x), torch.where(better, loss, best_l)


def _pick_expert(best_alpha: torch.Tensor, best_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-(t, row) 1-D solutions [T, B] to one active expert per row: alphas [B, T], loss [B]."""
    t = best_loss.argmin(0)  # [B]  ties: the first expert
    rows = torch.arange(best_loss.shape[1], device=best_loss.device)
    alphas = torch.zeros_like(best_alpha.T)  # [B, T]
    alphas[rows, t] = best_alpha[t, rows]
    return alphas, best_loss[t, rows]


Lines = Callable[[torch.Tensor, bool], Curve]  # alpha [..., T, B], derivs -> the one-expert curves


@dataclass(frozen=True)
class LineProblem:
    """What grid and newton read: the targets and the one-expert curves (from a Problem, or from the native
    kernels' binned moments, which never build the [T, B, V] deltas)."""

    a: torch.Tensor  # [B, T] targets KL(Q_t || Q)
    b: torch.Tensor  # [B, T] targets KL(Q || Q_t)
    lines: Lines | None  # None: only the grid's curves are known (enough for solve="grid")
    chunk: int | None = None  # grid points per curve call (exact curves: bounds the [g, T, B, V] temporaries)
    grid: Curve | None = None  # A, B [G, T, B] at grid_points(max_alpha), when computed beforehand

    @staticmethod
    def of(pb: Problem, max_alpha: float, curves: str) -> LineProblem:
        """The curves "exact" (line_curve, [.., V] passes) or "auto" (BinnedLines where they pay)."""
        binned = BinnedLines.maybe(pb, max_alpha) if curves == "auto" else None
        if binned is not None:
            return LineProblem(pb.a, pb.b, binned)
        T, B, V = pb.shape
        return LineProblem(pb.a, pb.b, functools.partial(line_curve, pb), max(1, _CHUNK_ELEMENTS // max(1, T * B * V)))


def _grid_losses(lp: LineProblem, pts: torch.Tensor) -> torch.Tensor:
    """Loss with one expert at a time at every grid point: [G, T, B]. Chunked over grid points, never over rows."""
    B, T = lp.a.shape
    if lp.grid is not None:
        return targets_loss(lp.grid.A, lp.grid.B, lp.a, lp.b)  # [G, T, B]
    assert lp.lines is not None
    chunk = lp.chunk or pts.shape[0]
    losses = []
    for start in range(0, pts.shape[0], chunk):
        alpha = pts[start : start + chunk, None, None].expand(-1, T, B)  # [g, T, B]
        c = lp.lines(alpha, False)
        losses.append(targets_loss(c.A, c.B, lp.a, lp.b))  # [g, T, B]
    return torch.cat(losses)  # [G, T, B]


def grid_on_lines(lp: LineProblem, max_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid search on prepared curves: alphas [B, T] (one expert active) and loss [B]."""
    B, T = lp.a.shape
    pts = grid_points(max_alpha, lp.a.dtype, lp.a.device)  # [G]
    losses = _grid_losses(lp, pts)  # [G, T, B]
    flat = losses.permute(2, 0, 1).reshape(B, -1)  # [B, G*T], grid-major: smallest alpha wins ties
    best = flat.argmin(-1)  # [B]
    g, t = best // T, best % T
    rows = torch.arange(B, device=flat.device)
    alphas = torch.zeros(B, T, dtype=pts.dtype, device=pts.device)
    alphas[rows, t] = pts[g]
    return alphas, flat[rows, best]


def solve_grid(pb: Problem, max_alpha: float, curves: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's search: one expert at a time on the 0.1 grid, the single best (t, alpha) per row."""
    return grid_on_lines(LineProblem.of(pb, max_alpha, curves), max_alpha)


def _newton_1d(lp: LineProblem, max_alpha: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (t, row): alpha_t alone in [0, max_alpha], the full T-term loss. Returns best alpha and loss, [T, B].

    The loss of one expert can have several local minima when the targets are large (a few nats), so the 1-D solve
    is seeded by the grid's values: safeguarded Newton then runs inside one grid step either side of the best grid
    point. The result is never worse than the grid and never more than one grid step from it.
    """
    B, T = lp.a.shape
    lines = lp.lines
    assert lines is not None, "newton needs the curves between grid points"
    pts = grid_points(max_alpha, lp.a.dtype, lp.a.device)  # [G]
    grid = _grid_losses(lp, pts)  # [G, T, B]
    best_l, g = grid.min(0)  # [T, B]  ties: the smallest alpha
    best_x = pts[g]  # [T, B]
    lo = (best_x - GRID_STEP).clamp_min(0.0)
    hi = (best_x + GRID_STEP).clamp_max(max_alpha)
    a_sum, b_sum = lp.a.sum(-1), lp.b.sum(-1)  # [B]
    x = best_x
    for _ in range(iters):
        c = lines(x, True)
        best_x, best_l = _keep_better(best_x, best_l, x, targets_loss(c.A, c.B, lp.a, lp.b))
        ra, rb = T * c.A - a_sum, T * c.B - b_sum  # [T, B]  sum_t (A - a_t), sum_t (B - b_t)
        d1 = 2.0 * (ra * c.dA + rb * c.dB)  # loss'(x); exactly 0 at x = 0, where the loss falls or stays flat
        d2 = 2.0 * (T * (c.dA.square() + c.dB.square()) + ra * c.d2A + rb * c.d2B)  # loss''(x)
        gn = 2.0 * T * (c.dA.square() + c.dB.square())  # Gauss-Newton curvature, >= 0
        right = (d1 < 0) | (x <= 0)  # the minimum lies to the right of x
        lo = torch.where(right, x, lo)
        hi = torch.where(right, hi, x)
        newton, gauss = x - d1 / d2, x - d1 / gn
        ok_newton = (d2 > 0) & (newton > lo) & (newton < hi)  # False for NaN
        ok_gauss = (gauss > lo) & (gauss < hi)
        x = torch.where(ok_newton, newton, torch.where(ok_gauss, gauss, 0.5 * (lo + hi)))
    c = lines(x, False)
    return _keep_better(best_x, best_l, x, targets_loss(c.A, c.B, lp.a, lp.b))


def newton_on_lines(lp: LineProblem, max_alpha: float, iters: int = NEWTON_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """The newton solve on prepared curves: alphas [B, T] (the best expert per row) and loss [B]."""
    return _pick_expert(*_newton_1d(lp, max_alpha, iters))


def solve_newton(
    pb: Problem, max_alpha: float, iters: int = NEWTON_ITERS, curves: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's family (one expert at a time) solved continuously; the best expert per row."""
    return newton_on_lines(LineProblem.of(pb, max_alpha, curves), max_alpha, iters)


def projected_newton_step(alpha: torch.Tensor, grad: torch.Tensor, hess: torch.Tensor, max_alpha: float):
    """One projected Newton step on [0, max_alpha]^T with |eigenvalues| (saddle-free). [B, T] -> [B, T]."""
    T = alpha.shape[-1]
    fixed = ((alpha <= 0) & (grad > 0)) | ((alpha >= max_alpha) & (grad < 0))  # [B, T] held at their bound
    free = ~fixed
    pair = free.unsqueeze(-1) & free.unsqueeze(-2)  # [B, T, T]
    eye = torch.eye(T, dtype=hess.dtype, device=hess.device)
    h = torch.nan_to_num(torch.where(pair, hess, eye))  # [B, T, T]
    g = torch.nan_to_num(torch.where(free, grad, torch.zeros_like(grad)))  # [B, T]
    h = 0.5 * (h + h.mT)
    evals, evecs = torch.linalg.eigh(h)  # [B, T], [B, T, T]
    floor = 1e-6 * evals.abs().amax(-1, keepdim=True) + 1e-12
    inv = 1.0 / evals.abs().clamp_min(floor)  # [B, T]
    step = -(evecs @ (inv.unsqueeze(-1) * (evecs.mT @ g.unsqueeze(-1)))).squeeze(-1)  # [B, T]
    return (alpha + step).clamp(0.0, max_alpha)


def solve_joint(
    pb: Problem, max_alpha: float, iters: int = JOINT_ITERS, curves: str = "exact"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every alpha at once, from the newton (one-at-a-time) solution; the loss never rises above it."""
    start, _ = solve_newton(pb, max_alpha, curves=curves)  # [B, T]
    return joint_from(functools.partial(joint_terms, pb), start, max_alpha, iters)


JointTerms = Callable[[torch.Tensor, bool], Joint]  # alphas [B, T], derivs -> the loss (and its derivatives)


def joint_from(
    terms: JointTerms, start: torch.Tensor, max_alpha: float, iters: int = JOINT_ITERS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected Newton from `start` [B, T] on the loss `terms` evaluates (joint_terms of a Problem, or the native
    kernels' exact passes); every row keeps its best point, so the loss never rises above the start's."""
    best_a = start
    j = terms(best_a, True)
    best_l, best_g, best_h = j.loss, j.grad, j.hess
    cand = projected_newton_step(best_a, best_g, best_h, max_alpha)
    for _ in range(iters):
        j = terms(cand, True)
        better = j.loss < best_l  # [B]
        b1, b2 = better[:, None], better[:, None, None]
        best_a = torch.where(b1, cand, best_a)
        best_l = torch.where(better, j.loss, best_l)
        best_g = torch.where(b1, j.grad, best_g)
        best_h = torch.where(b2, j.hess, best_h)
        retry = best_a + 0.5 * (cand - best_a)  # a rejected candidate is pulled halfway back
        cand = torch.where(b1, projected_newton_step(best_a, best_g, best_h, max_alpha), retry)
    return best_a, best_l


CURVES = ("exact", "auto")


def solve_problem(pb: Problem, solver: str, max_alpha: float, curves: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """alphas [B, T] and loss [B] for a prepared problem. curves: how the one-expert curves of grid and newton
    (and joint's newton start) are evaluated: "exact" on every token, "auto" from binned moments where that pays
    (BinnedLines: each sum within truncation_bound() relative; joint's own iterations stay exact).

    Per step: the solver and max_alpha come from a validated recipe (or solve_alphas' checks) and are not checked
    again; an unknown solver still gets check_solver's error."""
    solve = _SOLVE.get(solver)
    if solve is None:
        check_solver(solver)
    if curves not in CURVES:
        raise ValueError(f"curves={curves!r}: must be one of {', '.join(CURVES)}")
    return solve(pb, float(max_alpha), curves=curves)  # type: ignore[misc]


_SOLVE = {"grid": solve_grid, "newton": solve_newton, "joint": solve_joint}  # keys: exactly methods.SOLVERS (tested)


def solve_alphas(
    l_large: torch.Tensor,
    l_small: torch.Tensor,
    l_experts: torch.Tensor | Sequence[torch.Tensor],
    solver: str,
    max_alpha: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DLF weights per row: l_large, l_small [B, V] and l_experts [T, B, V] log-probs -> (alphas [B, T], loss [B])."""
    check_solver(solver)
    max_alpha = check_max_alpha(max_alpha)
    pb = problem_from_log_probs(l_large, l_small, l_experts)
    return solve_problem(pb, solver, max_alpha)
