"""The CPU kernels of the DLF fast path (kernels.c), compiled on first use and loaded with ctypes.

Why native code: a dense DLF row (one whose certified support does not separate: flat, random-init and the bulk of
trained models) needs its targets, the centring of its deltas and the binned moments of docs/algorithms.md §3. In
torch that is ~30 passes over [T, B, V] plus nine index_add_ scatters (1.2 ns per element and moment on this
machine); kernels.c does it in two passes per row, with the exps vectorised (glibc's libmvec) and the scatter into an
L1-resident table.

Building: ``$CC`` (default ``cc``) with ``-O3 -march=native -ffast-math``, once per source version, compiler and CPU
into ``$LOGITFUSION_KERNEL_CACHE`` (default ``~/.cache/logitfusion/kernels``); concurrent processes (Ray workers)
write to private temporary names and rename, so none loads a half-written library. The CPU's model and flags are
part of the file name, so a cache shared between unlike nodes never loads code built for another CPU.
``-ffast-math`` is safe here: every input is finite (the caller's guard checked it) and every sum is float64.

``LOGITFUSION_NATIVE=0`` turns the kernels off; without a compiler, on a non-CPU tensor, or when the build fails,
``kernels()`` is None (logged once) and fusion stays on its torch path, which computes the same quantities.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from .dlf import GRID_STEP, BinnedLines, Curve, Joint, LineProblem, grid_points, targets_loss

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
ABI_VERSION = 9  # lf_abi_version() of the source this module binds
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC")  # compiling
LINK = ("-shared",)  # linking: no -ffast-math (see build)
_P = ctypes.c_void_p
_I = ctypes.c_int64


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags (Linux), or the platform's description elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def cache_dir() -> Path:
    return Path(os.environ.get("LOGITFUSION_KERNEL_CACHE") or Path.home() / ".cache" / "logitfusion" / "kernels")


def library_path(compiler: str) -> Path:
    """Where the library built from this source, with this compiler and flags, for this CPU, lives."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), repr((FLAGS, LINK)).encode(), _cpu_fingerprint().encode(),
                 platform.machine().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"lf_kernels-{key.hexdigest()[:16]}.so"


def build(compiler: str | None = None) -> Path:
    """Compile kernels.c (if not already in the cache) and return the library's path. Raises RuntimeError with the
    compiler's message when it fails."""
    cc = compiler or os.environ.get("CC") or "cc"
    exe = shutil.which(cc)
    if exe is None:
        raise RuntimeError(f"no C compiler: {cc!r} is not on PATH (set CC, or LOGITFUSION_NATIVE=0)")
    out = library_path(exe)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
    os.close(fd)
    try:
        # Compile and link apart: linked with -ffast-math, gcc adds crtfastmath.o, whose constructor turns on
        # flush-to-zero for the whole process when the library loads (torch's and Python's denormals included).
        for cmd in ([exe, *FLAGS, "-c", "-o", tmp + ".o", str(SOURCE)], [exe, *LINK, "-o", tmp, tmp + ".o", "-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed ({proc.returncode}) building {SOURCE.name}: "
                                   f"{proc.stderr.strip()[:2000]}")
        os.replace(tmp, out)  # atomic: a concurrent builder's identical file is replaced whole
    finally:
        for path in (tmp, tmp + ".o"):
            if os.path.exists(path):
                os.unlink(path)
    return out


class Kernels:
    """The loaded library, with typed entry points (see kernels.c for each one's layout)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.lf_abi_version.restype = ctypes.c_int
        lib.lf_moments.restype = ctypes.c_int
        if lib.lf_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path}: ABI {lib.lf_abi_version()}, this module binds {ABI_VERSION}")
        lib.lf_dlf_pass1.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_double, ctypes.c_double, _I, _P, _P]
        lib.lf_dlf_pass1.restype = ctypes.c_int64
        lib.lf_bin_moments.argtypes = [_I, _I, _I, _I, ctypes.c_double, _P, _P, _P, _P, _P]
        lib.lf_bin_moments.restype = None
        lib.lf_joint_moments.argtypes = [_I, _I, _I, _P, _P, _P, _P, _P, ctypes.c_int, _P]
        lib.lf_joint_moments.restype = None
        lib.lf_grid_curves.argtypes = [_I, _I, _I, _I, ctypes.c_double, _P, _P, _P, _P, _P]
        lib.lf_grid_curves.restype = None
        lib.lf_static_fuse.argtypes = [_I, _I, _I, _P, _P, _I, _P]
        lib.lf_static_fuse.restype = ctypes.c_int64
        lib.lf_exp_check.argtypes = [_I, _P, _P]
        lib.lf_exp_check.restype = ctypes.c_int
        self.lib = lib
        self.path = path
        self.moments = int(lib.lf_moments())


@functools.lru_cache(maxsize=1)
def _load() -> Kernels | None:
    if os.environ.get("LOGITFUSION_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("native DLF kernels off (LOGITFUSION_NATIVE=0): fusion uses its torch path")
        return None
    try:
        return Kernels(build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("native DLF kernels unavailable, fusion uses its torch path: %s", exc)
        return None


def kernels() -> Kernels | None:
    """The kernels, built and loaded once per process; None when they are off or cannot be built."""
    return _load()


EXP_LIMIT = 600.0  # max_alpha * sum_t max |Delta_t| above this: exp could overflow float64, so the torch path decides


def usable(*mats: torch.Tensor) -> Kernels | None:
    """The kernels, if they can take these tensors (CPU, fp32)."""
    kern = kernels()
    if kern is None or any(x.device.type != "cpu" or x.dtype != torch.float32 for x in mats):
        return None
    return kern


class DenseRows:
    """One DLF step's rows straight from finite raw fp32 logits [R, V], by kernels.c pass 1: the guard, the targets,
    E_P[d_t], each delta's range, P up to its row sum, and each row's certified candidate support (counts; the
    indices of rows with at most ``limit`` candidates). It never builds the [T, R, V] deltas: for the rows solved on
    the whole vocabulary the one-expert curves come from binned moments (lines) or exact grid sweeps (grid_lines),
    joint's terms from one pass per evaluation (joint_terms); candidates.native_candidate_problem gathers the
    others' candidates. ``bad``: how many logits were not finite (then nothing else means anything)."""

    def __init__(self, kern: Kernels, z_large: torch.Tensor, z_small: torch.Tensor, z_experts: Sequence[torch.Tensor],
                 *, max_alpha: float = 2.0, slack: float = 0.0, limit: int = 0):
        self.kern = kern
        self.R, self.V = z_large.shape
        self.T = T = len(z_experts)
        self.zl = z_large.contiguous()
        self.zs = z_small.contiguous()
        self.ze = [x.contiguous() for x in z_experts]
        self._ptrs = (ctypes.c_void_p * T)(*[x.data_ptr() for x in self.ze])
        self.w = torch.empty(self.R, self.V, dtype=torch.float32)  # exp(z_L - max z_L): P up to its row sum
        out = torch.empty(self.R, T + 1, 5, dtype=torch.float64)
        self.counts = torch.empty(self.R, dtype=torch.int64)  # certified candidates per row
        self.limit = limit
        self.idx = torch.empty(self.R, limit, dtype=torch.int32) if limit > 0 else None  # [R, limit]
        self.bad = int(kern.lib.lf_dlf_pass1(
            self.R, T, self.V, self.zl.data_ptr(), self.zs.data_ptr(), self._ptrs, self.w.data_ptr(), out.data_ptr(),
            max_alpha, slack, limit, self.counts.data_ptr(), None if self.idx is None else self.idx.data_ptr()))
        self.a, self.b = out[:, :T, 0].contiguous(), out[:, :T, 1].contiguous()  # [R, T] targets
        self.mean = out[:, :T, 2].contiguous()  # [R, T]  E_P[d_t]
        self.lo, self.hi = out[:, :T, 3].T.contiguous(), out[:, :T, 4].T.contiguous()  # [T, R] range of d_t
        self.norm = out[:, T, 0].contiguous()  # [R] sum of w
        reach = torch.maximum(self.hi - self.mean.T, self.mean.T - self.lo)  # [T, R] max |Delta_t|
        self.reach = float(reach.sum(0).max()) if self.R and not self.bad else math.inf

    def fits(self, max_alpha: float) -> bool:
        """Whether exp(sum_t alpha_t Delta_t) stays far from float64 overflow for every alpha in the box."""
        return max_alpha * self.reach <= EXP_LIMIT

    def lines(self, max_alpha: float) -> LineProblem | None:
        """The binned one-expert curves (kernels.c pass 2; each sum within dlf.truncation_bound() relative, as
        dlf.BinnedLines.from_problem), or None where the bins do not pay."""
        T, R = self.T, self.R
        bins, width = BinnedLines.bins_for(float((self.hi - self.lo).max()), max_alpha)
        if not BinnedLines.pays(bins, self.V):
            return None
        S = torch.empty(T, R, bins, self.kern.moments, dtype=torch.float64)
        self.kern.lib.lf_bin_moments(R, T, self.V, bins, width, self.zs.data_ptr(), self._ptrs, self.w.data_ptr(),
                                     self.lo.data_ptr(), S.data_ptr())
        S.div_(self.norm.view(1, R, 1, 1))  # P normalised
        offsets = (torch.arange(bins, dtype=torch.float64) + 0.5) * width  # [K]
        centre = self.lo.unsqueeze(-1) + offsets - self.mean.T.unsqueeze(-1)  # [T, R, K] in the centred frame
        return LineProblem(self.a, self.b, BinnedLines(S, centre, torch.float64))

    def grid_lines(self, max_alpha: float) -> LineProblem:
        """The one-expert curves at every point of grid_points(max_alpha), exactly (kernels.c lf_grid_curves: one
        exp per token, then a multiplication per grid point), for the grid solver. Needs fits(max_alpha)."""
        T, R = self.T, self.R
        pts = grid_points(max_alpha, torch.float64, torch.device("cpu"))  # [G]: 0, h, 2h, ... (+ max_alpha)
        uniform = int(round(float(pts[-1]) / GRID_STEP)) + 1 if abs(float(pts[-1]) / GRID_STEP - round(
            float(pts[-1]) / GRID_STEP)) < 1e-9 else pts.shape[0] - 1
        parts = [self._grid_sums(uniform, GRID_STEP)]
        if uniform < pts.shape[0]:  # max_alpha itself, off the grid: the points 0 and max_alpha
            parts.append(self._grid_sums(2, float(pts[-1]))[:, :, 1:])
        sums = torch.cat(parts, dim=2)  # [T, R, G, 2]
        z0 = sums[..., 0]
        g = (z0 / self.norm.view(1, R, 1)).log().permute(2, 0, 1)  # [G, T, R]  log E_P[exp(alpha Delta)]
        g[0] = 0.0  # alpha = 0: exactly
        mu = (sums[..., 1] / z0).permute(2, 0, 1)  # [G, T, R]  E_Pt[Delta]
        A = (pts.view(-1, 1, 1) * mu - g).clamp_min(0.0)
        return LineProblem(self.a, self.b, None, grid=Curve(A=A, B=g.clamp_min(0.0)))

    def _grid_sums(self, points: int, step: float) -> torch.Tensor:
        out = torch.empty(self.T, self.R, points, 2, dtype=torch.float64)
        self.kern.lib.lf_grid_curves(self.R, self.T, self.V, points, step, self.zs.data_ptr(), self._ptrs,
                                     self.w.data_ptr(), self.mean.data_ptr(), out.data_ptr())
        return out

    def joint_terms(self, alphas: torch.Tensor, derivs: bool) -> Joint:
        """dlf.joint_terms at alphas [R, T], exactly (one pass over V per call, float64)."""
        T, R = self.T, self.R
        al = alphas.to(torch.float64).contiguous()
        out = torch.zeros(R, 1 + T + 2 * T * T, dtype=torch.float64)
        self.kern.lib.lf_joint_moments(R, T, self.V, self.zs.data_ptr(), self._ptrs, self.w.data_ptr(),
                                       self.mean.data_ptr(), al.data_ptr(), int(derivs), out.data_ptr())
        z = out[:, 0]
        mu = out[:, 1 : 1 + T] / z[:, None]  # [R, T]  E_Pt[Delta_t] (= grad B)
        es = (al * mu).sum(-1)  # [R]  E_Pt[s]
        g = (z / self.norm).log()  # [R]  log E_P[exp(s)]
        A, B = (es - g).clamp_min(0.0), g.clamp_min(0.0)
        loss = targets_loss(A, B, self.a, self.b)
        if not derivs:
            return Joint(loss)
        upper = torch.triu_indices(T, T)
        m2 = torch.zeros(R, T, T, dtype=torch.float64)
        m3 = torch.zeros(R, T, T, dtype=torch.float64)
        sums2 = out[:, 1 + T : 1 + T + T * T].view(R, T, T)
        sums3 = out[:, 1 + T + T * T :].view(R, T, T)
        m2[:, upper[0], upper[1]] = sums2[:, upper[0], upper[1]] / z[:, None]
        m3[:, upper[0], upper[1]] = sums3[:, upper[0], upper[1]] / z[:, None]
        m2 = m2 + m2.mT * (1 - torch.eye(T, dtype=torch.float64))  # E_Pt[Delta_t Delta_q]
        m3 = m3 + m3.mT * (1 - torch.eye(T, dtype=torch.float64))  # E_Pt[s Delta_t Delta_q]
        cov = m2 - mu.unsqueeze(-1) * mu.unsqueeze(-2)  # [R, T, T]
        e_s_d = torch.einsum("rq,rqt->rt", al, m2)  # [R, T]  E_Pt[s Delta_t]
        # E[(s - Es)(Delta_t - mu_t)(Delta_q - mu_q)], expanded in raw moments
        k3 = (m3 - es[:, None, None] * m2 - mu.unsqueeze(-2) * (e_s_d - es[:, None] * mu).unsqueeze(-1)
              - mu.unsqueeze(-1) * (e_s_d - es[:, None] * mu).unsqueeze(-2))
        grad_a = torch.einsum("rtq,rq->rt", cov, al)  # [R, T]  Cov_Pt(s, Delta_t)
        ra = (T * A - self.a.sum(-1))[:, None]  # [R, 1]  sum_t (A - a_t)
        rb = (T * B - self.b.sum(-1))[:, None]
        grad = 2.0 * (ra * grad_a + rb * mu)
        outer = grad_a.unsqueeze(-1) * grad_a.unsqueeze(-2) + mu.unsqueeze(-1) * mu.unsqueeze(-2)
        hess = 2.0 * (T * outer + ra[..., None] * (cov + k3) + rb[..., None] * cov)
        return Joint(loss, grad, hess)


def static_log_probs(
    kern: Kernels, mats: Sequence[torch.Tensor], weights: Sequence[float] | torch.Tensor
) -> torch.Tensor | None:
    """log_softmax(sum_m w_m (z_m - max z_m)) [B, V] of finite fp32 CPU logits in one read of each model
    (kernels.c lf_static_fuse); weights: one per model, or a [B, M] tensor of per-row weights. None when a logit
    is not finite."""
    zs = [x.contiguous() for x in mats]
    B, V = zs[0].shape
    ptrs = (ctypes.c_void_p * len(zs))(*[x.data_ptr() for x in zs])
    per_row = isinstance(weights, torch.Tensor)
    w = (weights.to(torch.float64).contiguous() if per_row else torch.tensor(list(weights), dtype=torch.float64))
    out = torch.empty(B, V, dtype=torch.float32)
    bad = kern.lib.lf_static_fuse(B, len(zs), V, ptrs, w.data_ptr(), len(zs) if per_row else 0, out.data_ptr())
    return None if bad else out
