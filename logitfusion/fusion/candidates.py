"""The fast path of fuse(): one pass over the logits, and the DLF solve on a certified candidate support.

docs/algorithms.md §4 ("Certified candidate support") states the bound, its proof
and the defaults. In short, with every alpha_t in [0, A] and d_t = Delta_t up to a per-row constant:

    U_v = z_L,v + A sum_t max(d_t,v, 0)          (no alpha in the box lifts token v above U_v, relative to the row)
    L   = max_v [ z_L,v + A sum_t min(d_t,v, 0) ] (some token stays at least this high, for every alpha)

A token with U_v < L - tau has fused probability below exp(-tau) under every alpha in the box, and large-base
probability below exp(-tau) too (alpha = 0 is in the box). With tau = ln(V / eps) the tokens dropped together carry
at most eps of the mass of P and of every Pt the solver can visit. The DLF problem is solved on the kept tokens only
(P renormalised on them, deltas centred under that P), in float64; the targets KL(Q_t || Q), KL(Q || Q_t) involve
only the small models and come from the one dense pass. Rows whose bound does not separate (more than
max_fraction * V candidates: flat distributions, and the bulk of trained models) are solved on the whole vocabulary
(dense_rows): on CPU fp32 by the native kernels (native.py), else by the dense reference arithmetic.

The fast path needs finite logits everywhere (no masked token): one amax and one amin per model and row decide that
(taken chunk by chunk with the other passes; with the native kernels, inside their candidate count), and double as
the NaN guard. Anything else (a -inf mask, NaN, +inf)
returns None and fuse() takes the dense path, which handles masks and raises the precise error naming the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import native
from .dlf import Problem, _softmax_parts, grid_on_lines, joint_from, newton_on_lines, prepare, solve_problem


DEFAULT_EPS = 1e-9  # certified bound on the mass the candidate support may drop (of P and of every Pt in the box)
MAX_FRACTION = 0.25  # a row with more candidates than this fraction of V is solved densely (gathering costs more)
SUPPORT_MODES = ("auto", "dense", "candidates")  # auto: candidates where they pay; dense: the reference path
_ROUNDING_MARGIN = 1e-3  # nats added to tau so fp32 rounding of U and L can only keep more tokens, never fewer
_CHUNK_BYTES = 1 << 19  # rows are processed in chunks of about this many bytes per [rows, V] buffer, so every
# intermediate pass of a chunk stays in the CPU's L2 cache: memory traffic, not arithmetic, bounds these passes
_DENSE_SOLVE_BYTES = 1 << 22  # a dense (fallback) solve takes about this many bytes of deltas per row chunk


def check_support(support: object, eps: object) -> tuple[str, float]:
    """The support mode and eps of fuse(), or a ValueError naming the field and its limit."""
    if support not in SUPPORT_MODES:
        raise ValueError(f"support={support!r}: must be one of {', '.join(SUPPORT_MODES)}")
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool)
    if not ok or not math.isfinite(eps) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps={eps!r}: must be finite and in (0, 1)")
    return support, float(eps)  # type: ignore[return-value]


def tau_for(vocab: int, eps: float) -> float:
    """The margin in nats below which a token is certified negligible: ln(V / eps)."""
    return math.log(vocab / eps)


def row_chunks(rows: int, vocab: int, itemsize: int) -> list[slice]:
    """Row slices of about _CHUNK_BYTES per [rows, V] buffer (at least one row each)."""
    step = max(1, _CHUNK_BYTES // max(1, vocab * itemsize))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _scratch(like: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n buffers of one row chunk: [chunk rows, V] each."""
    rows = row_chunks(like.shape[0], like.shape[-1], like.element_size())[0].stop
    return [torch.empty(rows, like.shape[-1], dtype=like.dtype, device=like.device) for _ in range(n)]


def log_softmax_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim in place, using `scratch` (same shape) for the exponentials: no allocation of
    [B, V] (a fresh 8 MB tensor costs its page faults on every step). x holds scores near 0 at the top. -> x"""
    top = x.amax(-1, keepdim=True)  # [B, 1]
    sums = torch.sub(x, top, out=scratch).exp_().sum(-1, keepdim=True)  # [B, 1]
    return x.sub_(top + sums.log())


def _row_extremes(
    z: Sequence[torch.Tensor], rows: slice, maxes: torch.Tensor, mins: torch.Tensor
) -> None:
    """Each model's max and min over the chunk's rows, into maxes[m, rows] and mins[m, rows] ([M, B] each). Done
    chunk by chunk, just before the chunk's other passes, so the guard costs no extra trip to memory."""
    for m, x in enumerate(z):
        torch.amax(x[rows], -1, out=maxes[m, rows])
        torch.amin(x[rows], -1, out=mins[m, rows])


def _all_finite(maxes: torch.Tensor, mins: torch.Tensor) -> bool:
    """The guard: every logit finite (amax and amin propagate NaN; +inf shows in the max, -inf in the min)."""
    return bool(torch.isfinite(maxes).all() and torch.isfinite(mins).all())


def static_log_probs(z: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor | None:
    """log_softmax(sum_m w_m z_m), or None when a logit is not finite (then the dense path decides).

    Every per-model normalisation is a per-row constant that no softmax sees, so the raw logits suffice. Each z_m
    is centred on its row max first (exact near the top, where the mass is) so the sum keeps the precision of
    log-probs. z: logits [B, V] per model (every model the recipe reads, weight 0 included: all are guarded);
    weights: the recipe's total coefficient per model.
    """
    names = list(z)
    first = z[names[0]]
    kern = native.usable(*z.values())
    if kern is not None:  # the same arithmetic in one read of each model (kernels.c lf_static_fuse)
        return native.static_log_probs(kern, [z[n] for n in names], [weights[n] for n in names])
    B, V = first.shape
    maxes = torch.empty(len(names), B, dtype=first.dtype, device=first.device)
    mins = torch.empty_like(maxes)
    scores = torch.zeros_like(first)  # [B, V]  the result (every weight 0 gives the uniform distribution)
    (scratch,) = _scratch(first, 1)
    for rows in row_chunks(B, V, first.element_size()):
        _row_extremes([z[n] for n in names], rows, maxes, mins)
        out = scores[rows]
        buf = scratch[: out.shape[0]]
        for m, name in enumerate(names):
            w = weights[name]
            if w != 0.0:  # finite logits times 0 add exactly nothing
                out.add_(torch.sub(z[name][rows], maxes[m, rows].unsqueeze(-1), out=buf), alpha=w)
        log_softmax_(out, buf)
    return scores if _all_finite(maxes, mins) else None


@dataclass(frozen=True)
class DensePart:
    """What the one dense pass of a DLF step leaves: deltas up to a per-row constant, and the exact targets."""

    d: torch.Tensor  # [T, B, V] z_E - z_S - (max z_E - max z_S): Delta_t up to a per-row constant, exact near the top
    a: torch.Tensor  # [B, T] KL(Q_t || Q)
    b: torch.Tensor  # [B, T] KL(Q || Q_t)


def dlf_dense_pass(
    z_small: torch.Tensor, z_experts: Sequence[torch.Tensor], max_small: torch.Tensor,
    max_experts: Sequence[torch.Tensor], d: torch.Tensor, scratch: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deltas (written into d [T, B, V]) and the targets KL(Q_t || Q), KL(Q || Q_t) [B, T] from finite raw logits:
    one exp pass per small model.

    With n = sum exp(z - max z) per row, l = z - max z - log n, so Delta_t = l_E - l_S = d_t + k_t with d_t as
    stored and k_t a per-row constant computed in float64; KL(Q_t || Q) = E_Qt[Delta_t], KL(Q || Q_t) = -E_Q[Delta_t].
    scratch: three [B, V] buffers of z's dtype, overwritten.
    """
    eq, eqt, prod = scratch  # exp(z_S - max), exp(z_E - max), products
    n_s = torch.sub(z_small, max_small.unsqueeze(-1), out=eq).exp_().sum(-1).double()  # [B]
    a, b = [], []
    for t, (z_e, max_e) in enumerate(zip(z_experts, max_experts)):
        shift = max_e - max_small  # [B], as rounded in the compute dtype: the same value is subtracted below
        torch.sub(z_e, z_small, out=d[t]).sub_(shift.unsqueeze(-1))  # [B, V]
        n_e = torch.sub(z_e, max_e.unsqueeze(-1), out=eqt).exp_().sum(-1).double()  # [B]
        k = (shift.double() - (max_e.double() - max_small.double())) - (n_e.log() - n_s.log())  # [B]
        a.append(torch.mul(eqt, d[t], out=prod).sum(-1).double() / n_e + k)  # [B]  E_Qt[Delta_t]
        b.append(-(torch.mul(eq, d[t], out=prod).sum(-1).double() / n_s + k))  # [B]  -E_Q[Delta_t]
    dtype = z_small.dtype
    return torch.stack(a, -1).clamp_min(0.0).to(dtype), torch.stack(b, -1).clamp_min(0.0).to(dtype)  # [B, T] each


def _bound(
    z_large: torch.Tensor, d: torch.Tensor, max_alpha: float, tau: float, scratch: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [B, V], L - tau - margin [B, 1]): keep token v iff U_v >= the threshold. Overwrites scratch."""
    up, down, tmp = scratch
    torch.clamp(d[0], min=0.0, out=up)  # sum_t max(d_t, 0)
    torch.clamp(d[0], max=0.0, out=down)  # sum_t min(d_t, 0)
    for t in range(1, d.shape[0]):
        up.add_(torch.clamp(d[t], min=0.0, out=tmp))
        down.add_(torch.clamp(d[t], max=0.0, out=tmp))
    upper = torch.add(z_large, up, alpha=max_alpha, out=up)  # [B, V]  U_v (up to the row constant shared with L)
    lower = torch.add(z_large, down, alpha=max_alpha, out=down).amax(-1, keepdim=True)  # [B, 1]  L
    return upper, lower - (tau + _ROUNDING_MARGIN)


def candidate_mask(
    z_large: torch.Tensor, d: torch.Tensor, max_alpha: float, tau: float, scratch: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The certified support: True where U_v >= L - tau. z_large [B, V], d [T, B, V] -> [B, V] bool.
    scratch: three [B, V] buffers, overwritten."""
    upper, threshold = _bound(z_large, d, max_alpha, tau, scratch)
    return upper >= threshold


def _padded_indices(keep: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept token ids, left-aligned and padded: keep [R, V] -> (ids [R, K], valid [R, K]); K = max count."""
    R = keep.shape[0]
    K = int(counts.max()) if R else 0
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order
    starts = counts.cumsum(0) - counts  # [R]
    pos = torch.arange(rows.shape[0], device=keep.device) - starts[rows]
    ids = torch.zeros(R, K, dtype=torch.long, device=keep.device)
    valid = torch.zeros(R, K, dtype=torch.bool, device=keep.device)
    ids[rows, pos] = cols
    valid[rows, pos] = True
    return ids, valid


def _problem(l_large: torch.Tensor, d: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Problem:
    """A DLF problem from normalised log P [R, K] (-inf on padding) and deltas d [T, R, K] (0 on padding)."""
    m = torch.einsum("rk,trk->tr", l_large.exp(), d).unsqueeze(-1)  # [T, R, 1]  E_P[d_t]
    lse0, _ = _softmax_parts(l_large)  # [R]
    return Problem(l_large, d - m, a, b, lse0)  # deltas centred under P, as every solver expects


def candidate_problem(z_large: torch.Tensor, part: DensePart, rows: torch.Tensor, keep: torch.Tensor,
                      counts: torch.Tensor) -> Problem:
    """The DLF problem of `rows` restricted to their candidates, in float64 (K is small, so it costs nothing)."""
    T, B, V = part.d.shape
    every = rows.numel() == B  # the common case: no copy of the mask
    ids, valid = _padded_indices(keep if every else keep[rows], counts if every else counts[rows])  # [R, K]
    flat = (ids + (rows * V).unsqueeze(-1)).view(-1)  # [R*K] positions in a [B*V] row-major matrix
    R, K = ids.shape
    z = z_large.reshape(-1)[flat].view(R, K).double().masked_fill(~valid, float("-inf"))  # [R, K]
    d = part.d.reshape(T, -1)[:, flat].view(T, R, K).double().masked_fill(~valid, 0.0)  # [T, R, K]
    return _problem(torch.log_softmax(z, dim=-1), d, part.a[rows].double(), part.b[rows].double())


def fused_from_logits(
    kern: native.Kernels, z_large: torch.Tensor, z_small: torch.Tensor, z_experts: Sequence[torch.Tensor],
    alphas: torch.Tensor,
) -> torch.Tensor:
    """log_softmax(z_L + sum_t alpha_t (z_E,t - z_S)) [R, V] from finite raw fp32 logits (every per-model
    normalisation is a row constant) in one read of each model: kernels.c lf_static_fuse with per-row weights
    (1 on the large base, -sum_t alpha_t on the small one, alpha_t on expert t). The torch path's fused scores are
    fuse_dlf_fast's pass 2 (candidates) and dense_rows' reference arithmetic."""
    R = z_large.shape[0]
    al = alphas.to(torch.float64)
    weights = torch.cat([torch.ones(R, 1, dtype=torch.float64), -al.sum(-1, keepdim=True), al], dim=1)
    fused = native.static_log_probs(kern, [z_large, z_small, *z_experts], weights)
    assert fused is not None  # the caller's guard (pass 1) passed
    return fused


def dense_rows(
    z_large: torch.Tensor, z_small: torch.Tensor, z_experts: Sequence[torch.Tensor], solver: str, max_alpha: float,
    prepared: native.DenseRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows whose bound does not separate. z_*: finite raw logits [R, V]. -> alphas [R, T], loss [R], [R, V]

    With the native kernels (CPU fp32: native.DenseRows, docs/algorithms.md §4 "Dense rows on the native CPU
    kernels"; `prepared`: their pass 1 of exactly these rows, when the caller already ran it), straight from the
    logits: grid on its exact grid curves, newton on binned curves (where the bins
    pay), joint from that newton solution by exact native passes (where exp cannot overflow: DenseRows.fits).
    Otherwise the dense reference path's arithmetic (fuse_dense on finite logits: log_softmax per model,
    dlf.prepare, the solver on all V tokens, the fused scores), with grid and newton on dlf.BinnedLines where they
    pay; a row whose bins do not pay comes out bit for bit as the reference gives it. A few rows at a time: the
    solver's [points, T, rows, V] temporaries then stay in cache (1.5-4x less time than the whole batch at once at
    V = 128k); rows are independent, so the result is the batch's."""
    R, V = z_large.shape
    T = len(z_experts)
    kern = native.usable(z_large, z_small, *z_experts) if prepared is None else prepared.kern
    if kern is not None:
        dense = prepared or native.DenseRows(kern, z_large, z_small, z_experts)
        if solver == "grid" and dense.fits(max_alpha):
            lines = dense.grid_lines(max_alpha)
        else:
            lines = dense.lines(max_alpha) if solver != "joint" or dense.fits(max_alpha) else None
        if lines is not None:
            if solver == "grid":
                al, lo = grid_on_lines(lines, max_alpha)
            else:
                al, lo = newton_on_lines(lines, max_alpha)
                if solver == "joint":
                    al, lo = joint_from(dense.joint_terms, al, max_alpha)
            dtype = z_large.dtype
            return al.to(dtype), lo.to(dtype), fused_from_logits(kern, z_large, z_small, z_experts, al)
    step = max(1, _DENSE_SOLVE_BYTES // (T * V * z_large.element_size()))
    alphas, losses, fused = [], [], []
    for i in range(0, R, step):
        rows = slice(i, min(i + step, R))
        l_large = torch.log_softmax(z_large[rows], dim=-1)
        l_small = torch.log_softmax(z_small[rows], dim=-1)
        l_experts = torch.stack([torch.log_softmax(x[rows], dim=-1) for x in z_experts])  # [T, r, V]
        no_mask = torch.zeros_like(l_large, dtype=torch.bool)
        # grid and newton on binned line curves where that pays (dlf.BinnedLines: each sum within ~2e-9 relative)
        al, lo = solve_problem(prepare(l_large, l_small, l_experts, no_mask), solver, max_alpha, curves="auto")
        scores = torch.zeros_like(l_large) + 1.0 * l_large  # the reference's order of operations, op for op
        for t in range(T):
            scores = scores + al[:, t : t + 1] * (l_experts[t] - l_small)
        alphas.append(al)
        losses.append(lo)
        fused.append(torch.log_softmax(scores, dim=-1))
    return torch.cat(alphas), torch.cat(losses), torch.cat(fused)


@dataclass(frozen=True)
class DlfStep:
    alphas: torch.Tensor  # [B, T]
    loss: torch.Tensor  # [B]
    support_size: torch.Tensor  # [B] tokens the solve ran on (V for a dense row)


def native_candidate_problem(rows: native.DenseRows, which: torch.Tensor) -> Problem:
    """The DLF problem of rows `which` of a native pass 1 restricted to their certified candidates (its indices),
    in float64, as candidate_problem builds it from the torch pass."""
    counts = rows.counts[which]
    K = int(counts.max())
    assert rows.idx is not None and K <= rows.limit
    valid = torch.arange(K).unsqueeze(0) < counts.unsqueeze(1)  # [R, K]
    ids = rows.idx[which, :K].long().masked_fill(~valid, 0)  # [R, K]
    flat = (ids + (which * rows.V).unsqueeze(-1)).view(-1)  # [R*K] positions in a [B*V] matrix: no row copies

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)[flat].view(ids.shape).double()  # [R, K]

    z = take(rows.zl).masked_fill(~valid, float("-inf"))
    zs = take(rows.zs)
    d = torch.stack([take(x) - zs for x in rows.ze]).masked_fill(~valid, 0.0)  # [T, R, K]
    return _problem(torch.log_softmax(z, dim=-1), d, rows.a[which], rows.b[which])


def _fuse_native(
    kern: native.Kernels, z: Mapping[str, torch.Tensor], large: str, small: str, experts: Sequence[str], solver: str,
    max_alpha: float, tau: float, limit: int,
) -> tuple[torch.Tensor, DlfStep] | None:
    """fuse_dlf_fast on the native kernels: pass 1 (the guard, the targets, each row's candidate count and indices)
    sends every row with more than `limit` candidates to dense_rows, and solves the others on their candidates;
    None when a logit is not finite."""
    z_l, z_s, z_e = z[large], z[small], [z[e] for e in experts]
    B, V = z_l.shape
    rows = native.DenseRows(kern, z_l, z_s, z_e, max_alpha=max_alpha, slack=tau + _ROUNDING_MARGIN, limit=limit)
    if rows.bad:
        return None
    dense = rows.counts > limit
    n_dense = int(dense.sum())
    if n_dense == B:
        al, lo, lp = dense_rows(z_l, z_s, z_e, solver, max_alpha, prepared=rows)
        return lp, DlfStep(al, lo, torch.full((B,), V, dtype=torch.int64))
    fused = torch.empty_like(z_l)
    alphas = torch.zeros(B, len(experts), dtype=z_l.dtype)
    loss = torch.zeros(B, dtype=z_l.dtype)
    size = torch.where(dense, torch.full_like(rows.counts, V), rows.counts)
    if n_dense:
        which = dense.nonzero().squeeze(-1)
        al, lo, lp = dense_rows(z_l[which], z_s[which], [x[which] for x in z_e], solver, max_alpha)
        alphas[which], loss[which], fused[which] = al, lo, lp
    which = (~dense).nonzero().squeeze(-1)
    al, lo = solve_problem(native_candidate_problem(rows, which), solver, max_alpha)
    alphas[which], loss[which] = al.to(z_l.dtype), lo.to(z_l.dtype)
    if n_dense:
        fused[which] = fused_from_logits(kern, z_l[which], z_s[which], [x[which] for x in z_e], al)
    else:
        fused = fused_from_logits(kern, z_l, z_s, z_e, al)
    return fused, DlfStep(alphas, loss, size)


def fuse_dlf_fast(
    z: Mapping[str, torch.Tensor], large: str, small: str, experts: Sequence[str], solver: str, max_alpha: float,
    support: str, eps: float, max_fraction: float = MAX_FRACTION,
) -> tuple[torch.Tensor, DlfStep] | None:
    """One DLF step from raw logits: (fused log-probs [B, V], the solve), or None when a logit is not finite (then
    the dense path decides).

    Pass 1, over row chunks that fit in cache: the guard (row max and min), deltas, targets and the candidate mask.
    Then every row whose candidates are at most max_fraction * V (every row, support="candidates") is solved on
    them; the others take the dense reference arithmetic (dense_rows). Pass 2: the fused log-probs of the
    candidate rows.

    With the native kernels (support="auto", CPU fp32) pass 1 is kernels.c's (_fuse_native): the guard, the
    targets and each row's candidates in one read of the logits, and no [T, B, V] deltas.
    """
    z_l, z_s, z_e = z[large], z[small], [z[e] for e in experts]
    B, V = z_l.shape
    T = len(experts)
    dtype, device = z_l.dtype, z_l.device
    tau = tau_for(V, eps)
    kern = native.usable(z_l, z_s, *z_e) if support == "auto" else None
    if kern is not None:
        return _fuse_native(kern, z, large, small, experts, solver, max_alpha, tau, max(1, int(max_fraction * V)))
    maxes = torch.empty(T + 2, B, dtype=dtype, device=device)  # rows: large, small, experts
    mins = torch.empty_like(maxes)
    m_l, m_s, m_e = maxes[0], maxes[1], list(maxes[2:])
    d = torch.empty((T, B, V), dtype=dtype, device=device)  # [T, B, V]
    keep = torch.empty(B, V, dtype=torch.bool, device=device)
    scratch = _scratch(z_l, 3)
    chunks = row_chunks(B, V, z_l.element_size())
    targets = []
    for rows in chunks:
        n = rows.stop - rows.start
        bufs = [x[:n] for x in scratch]
        _row_extremes([z_l, z_s, *z_e], rows, maxes, mins)
        targets.append(dlf_dense_pass(z_s[rows], [x[rows] for x in z_e], m_s[rows], [x[rows] for x in m_e],
                                      d[:, rows], bufs))
        torch.ge(*_bound(z_l[rows], d[:, rows], max_alpha, tau, bufs), out=keep[rows])
    if not _all_finite(maxes, mins):
        return None
    part = DensePart(d, torch.cat([a for a, _ in targets]), torch.cat([b for _, b in targets]))
    counts = keep.sum(-1)  # [B]
    if support == "candidates":
        on_cand = torch.ones(B, dtype=torch.bool, device=device)
    else:
        on_cand = counts <= max(1, int(max_fraction * V))
    size = torch.where(on_cand, counts, torch.full_like(counts, V))
    n_cand = int(on_cand.sum())
    alphas = torch.zeros(B, T, dtype=dtype, device=device)
    loss = torch.zeros(B, dtype=dtype, device=device)
    fused = torch.empty_like(z_l)  # [B, V]
    if n_cand < B:
        rows = (~on_cand).nonzero().squeeze(-1)
        every = n_cand == 0
        al, lo, lp = dense_rows(z_l if every else z_l[rows], z_s if every else z_s[rows],
                                [x if every else x[rows] for x in z_e], solver, max_alpha)
        alphas[rows], loss[rows], fused[rows] = al, lo, lp
        if every:
            return fused, DlfStep(alphas, loss, size)
    rows = torch.arange(B, device=device) if n_cand == B else on_cand.nonzero().squeeze(-1)
    al, lo = solve_problem(candidate_problem(z_l, part, rows, keep, counts), solver, max_alpha)
    alphas[rows], loss[rows] = al.to(dtype), lo.to(dtype)
    for chunk in chunks:  # log_softmax(z_L + sum_t alpha_t d_t), d_t = Delta_t up to a row constant
        mine = on_cand[chunk]
        whole = n_cand == B or bool(mine.all())
        if not whole and not bool(mine.any()):
            continue
        target = fused[chunk] if whole else torch.empty_like(z_l[chunk])  # dense rows of the chunk are done
        out = torch.sub(z_l[chunk], m_l[chunk].unsqueeze(-1), out=target)
        for t in range(T):
            out.addcmul_(d[t, chunk], alphas[chunk, t : t + 1])
        log_softmax_(out, scratch[0][: out.shape[0]])
        if not whole:
            fused[chunk] = torch.where(mine.unsqueeze(-1), out, fused[chunk])
    return fused, DlfStep(alphas, loss, size)
