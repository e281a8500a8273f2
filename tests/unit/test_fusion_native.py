"""The native CPU kernels of the DLF fast path (logitfusion/fusion/kernels.c, native.py): each quantity they compute
is checked against the float64 torch arithmetic of the same thing, and the build itself (cache, off switch, a
missing or failing compiler, and that loading it leaves the process's floating-point mode alone)."""

from __future__ import annotations

import shutil

import pytest
import torch

from logitfusion.fusion import candidates as C
from logitfusion.fusion import dlf as D
from logitfusion.fusion import fuse, native, presets

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH: the kernels cannot be built"),
]
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_kernels():
    """Every test loads the kernels itself (some change the environment that decides whether they load)."""
    native._load.cache_clear()
    yield
    native._load.cache_clear()


def flat_logits(seed: int, B: int, V: int, T: int, scale: float = 3.0, spread: float = 1.0) -> dict[str, torch.Tensor]:
    """fp32 logits whose certified support never separates (every token near the top): the dense rows."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(B, V, generator=g) * scale
    z = {"large": small + torch.randn(B, V, generator=g) * scale * 0.5, "small": small}
    for t in range(T):
        z[f"e{t}"] = small + torch.randn(B, V, generator=g) * spread + 3.0 * t  # offsets: raw logits
    return z


def experts(z: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [z[k] for k in sorted(z) if k.startswith("e")]


def problem64(z: dict[str, torch.Tensor]) -> D.Problem:
    lp = {n: torch.log_softmax(x.double(), -1) for n, x in z.items()}
    ex = torch.stack([lp[k] for k in sorted(lp) if k.startswith("e")])
    return D.prepare(lp["large"], lp["small"], ex, torch.zeros_like(lp["large"], dtype=torch.bool))


def dense_rows_of(z: dict[str, torch.Tensor]) -> native.DenseRows:
    kern = native.kernels()
    assert kern is not None, "the kernels did not build (see the warning logged by logitfusion.fusion.native)"
    return native.DenseRows(kern, z["large"], z["small"], experts(z))


# ---------------------------------------------------------------------------------------------------------------
# The build


def test_loading_the_kernels_leaves_denormals_alone():
    # Linked with -ffast-math, gcc's crtfastmath.o would switch the whole process to flush-to-zero on load.
    tiny = 5e-324
    assert native.kernels() is not None
    assert tiny * 1.5 > 0.0
    assert float(torch.tensor([1e-40]) * 1.0) > 0.0


def test_the_library_is_cached_by_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITFUSION_KERNEL_CACHE", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.name.startswith("lf_kernels-")
    mtime = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == mtime  # built once
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    assert native.library_path("/usr/bin/another-cc") != first  # another compiler, another file


def test_off_switch_and_missing_or_failing_compiler_fall_back_to_torch(tmp_path, monkeypatch, caplog):
    z = flat_logits(0, 2, 3000, 2)
    recipe = presets.dlf("large", "small", ["e0", "e1"], solver="newton")
    with_kernels = fuse(z, recipe)
    monkeypatch.setenv("LOGITFUSION_NATIVE", "0")
    native._load.cache_clear()
    assert native.kernels() is None
    off = fuse(z, recipe)
    torch.testing.assert_close(off.alphas, with_kernels.alphas, atol=1e-4, rtol=0)
    assert torch.equal(off.logprobs.argmax(-1), with_kernels.logprobs.argmax(-1))
    monkeypatch.delenv("LOGITFUSION_NATIVE")
    monkeypatch.setenv("LOGITFUSION_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no C compiler: 'no-such-compiler' is not on PATH"):
        native.build()
    native._load.cache_clear()
    with caplog.at_level("WARNING", logger="logitfusion.fusion.native"):
        assert native.kernels() is None
    assert "native DLF kernels unavailable" in caplog.text
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match="false failed"):
        native.build()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# The quantities


@pytest.mark.parametrize("T", [1, 3])
def test_pass1_targets_and_centring_match_float64(T):
    z = flat_logits(1, 4, 5000, T)
    rows, pb = dense_rows_of(z), problem64(z)
    torch.testing.assert_close(rows.a, pb.a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rows.b, pb.b, atol=1e-6, rtol=1e-6)
    d = torch.stack([(x.double() - z["small"].double()) for x in experts(z)])  # [T, B, V] raw deltas
    p = torch.softmax(z["large"].double(), -1)
    torch.testing.assert_close(rows.mean.T, (p * d).sum(-1), atol=1e-6, rtol=1e-6)
    assert (rows.lo <= d.amin(-1)).all() and (rows.hi >= d.amax(-1)).all()
    torch.testing.assert_close(rows.w.double() / rows.norm[:, None], p, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("max_alpha", [0.5, 2.0, 10.0])
def test_binned_curves_from_the_kernels_match_the_exact_curves(max_alpha):
    z = flat_logits(2, 3, 20000, 2, scale=1.0, spread=0.5)
    lp = dense_rows_of(z).lines(max_alpha)
    assert lp is not None, "the bins should pay at V = 20000"
    pb = problem64(z)
    alpha = torch.rand(5, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * max_alpha
    got, want = lp.lines(alpha, True), D.line_curve(pb, alpha, True)
    for field in ("A", "B", "dA", "d2A", "dB", "d2B"):
        x, y = getattr(got, field), getattr(want, field)
        err = ((x - y).abs() / (1 + y.abs())).max()
        assert err <= 1e-7, (field, float(err))  # measured 2e-10 .. 2e-8: P in fp32 (1e-7 relative per token)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_joint_terms_from_the_kernels_match_joint_terms(T):
    z = flat_logits(4 + T, 4, 5000, T)
    rows, pb = dense_rows_of(z), problem64(z)
    alphas = torch.rand(4, T, generator=torch.Generator().manual_seed(T), dtype=torch.float64) * 2.0
    want = D.joint_terms(pb, alphas, True)
    for derivs in (False, True):
        got = rows.joint_terms(alphas, derivs)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-9)
        if derivs:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7 * float(want.grad.abs().max()))
            torch.testing.assert_close(got.hess, want.hess, rtol=1e-5, atol=1e-7 * float(want.hess.abs().max()))


def test_candidate_counts_and_indices_match_the_torch_mask_and_pass1_guards_every_model():
    z = flat_logits(7, 6, 4000, 2, scale=6.0)
    g = torch.Generator().manual_seed(8)
    z["large"][:3] *= 4.0  # peaked rows: some tokens are certified negligible
    z["large"][1, torch.randint(0, 4000, (5,), generator=g)] += 60.0
    zl, zs, ze = z["large"], z["small"], experts(z)
    tau = C.tau_for(4000, 1e-9)
    kern = native.kernels()
    rows = native.DenseRows(kern, zl, zs, ze, max_alpha=2.0, slack=tau + C._ROUNDING_MARGIN, limit=1000)
    assert rows.bad == 0
    maxes = {n: x.amax(-1) for n, x in z.items()}
    d = torch.empty(2, 6, 4000)
    scratch = [torch.empty(6, 4000) for _ in range(3)]
    C.dlf_dense_pass(zs, ze, maxes["small"], [maxes["e0"], maxes["e1"]], d, scratch)
    keep = C.candidate_mask(zl, d, 2.0, tau, scratch)
    assert torch.equal(rows.counts, keep.sum(-1)), (rows.counts, keep.sum(-1))
    small = (rows.counts <= 1000).nonzero().squeeze(-1)
    assert 0 < small.numel() < 6  # both kinds of rows
    for r in small.tolist():
        assert torch.equal(rows.idx[r, : rows.counts[r]].long(), keep[r].nonzero().squeeze(-1))
    for name in z:
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = dict(z)
            broken[name] = z[name].clone()
            broken[name][4, 17] = bad
            checked = native.DenseRows(kern, broken["large"], broken["small"], experts(broken), limit=1000)
            assert checked.bad >= 1, (name, bad)


# ---------------------------------------------------------------------------------------------------------------
# Whole steps against the float64 dense solve


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("solver", ["grid", "newton", "joint"])
def test_dense_rows_on_the_kernels_match_the_float64_dense_solve(T, solver):
    z = flat_logits(11 + T, 6, 6000, T)
    names = [f"e{t}" for t in range(T)]
    recipe = presets.dlf("large", "small", names, solver=solver)
    fast = fuse(z, recipe)  # auto: every row dense, on the kernels
    ref = fuse({n: x.double() for n, x in z.items()}, recipe, support="dense")
    assert (fast.support_size == 6000).all()
    pb = problem64(z)
    lf = D.joint_terms(pb, fast.alphas.double(), False).loss
    lr = D.joint_terms(pb, ref.alphas, False).loss
    torch.testing.assert_close(fast.loss.double(), lf, rtol=1e-5, atol=1e-9)  # the reported loss is the true one
    if solver == "grid":
        torch.testing.assert_close(fast.alphas.double(), ref.alphas, atol=1e-6, rtol=0)  # the same grid points
    elif solver == "newton":
        torch.testing.assert_close(fast.alphas.double(), ref.alphas, atol=1e-4, rtol=0)
    assert (lf <= lr * (1 + 1e-6) + 1e-9).all(), (lf, lr)
    assert torch.equal(fast.logprobs.argmax(-1), ref.logprobs.argmax(-1))
    torch.testing.assert_close(fast.logprobs.exp().double(), ref.logprobs.exp(), atol=2e-6, rtol=1e-4)


def test_a_batch_of_dense_and_candidate_rows_is_split_and_reassembled():
    z = flat_logits(21, 6, 6000, 2)
    g = torch.Generator().manual_seed(22)
    for row in (1, 4):  # peaked rows: few candidates
        z["large"][row] = torch.randn(6000, generator=g) * 2.0
        z["large"][row, torch.randint(0, 6000, (6,), generator=g)] += 80.0
    recipe = presets.dlf("large", "small", ["e0", "e1"], solver="newton")
    peaked = fuse({n: x[[1, 4]] for n, x in z.items()}, recipe)  # every row on its candidates
    assert (peaked.support_size < 1500).all()
    res = fuse(z, recipe)
    ref = fuse({n: x.double() for n, x in z.items()}, recipe, support="dense")
    assert res.support_size[1] < 1500 and res.support_size[4] < 1500
    assert all(int(res.support_size[r]) == 6000 for r in (0, 2, 3, 5))
    torch.testing.assert_close(res.alphas.double(), ref.alphas, atol=1e-4, rtol=0)
    assert torch.equal(res.logprobs.argmax(-1), ref.logprobs.argmax(-1))
    torch.testing.assert_close(res.logprobs.exp().double(), ref.logprobs.exp(), atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(peaked.alphas, res.alphas[[1, 4]], atol=1e-6, rtol=0)
    torch.testing.assert_close(peaked.logprobs, res.logprobs[[1, 4]], atol=1e-6, rtol=0)


def test_joint_falls_back_to_torch_where_exp_could_overflow():
    z = flat_logits(30, 2, 3000, 2, scale=40.0, spread=20.0)  # deltas spanning hundreds of nats
    rows = dense_rows_of(z)
    assert not rows.fits(10.0)
    recipe = presets.dlf("large", "small", ["e0", "e1"], solver="joint", max_alpha=10.0)
    res = fuse(z, recipe)
    assert torch.isfinite(res.alphas).all() and torch.isfinite(res.logprobs).all()
    ref = fuse({n: x.double() for n, x in z.items()}, recipe, support="dense")
    assert torch.equal(res.logprobs.argmax(-1), ref.logprobs.argmax(-1))


def test_static_fusion_on_the_kernels_matches_the_torch_pass_and_guards_every_model(monkeypatch):
    z = flat_logits(40, 5, 7000, 3, scale=4.0)
    weights = {"large": 1.0, "small": -2.0, "e0": 1.0, "e1": 0.5, "e2": 0.0}  # e2: read and guarded, adds nothing
    fast = C.static_log_probs(z, weights)
    exact = torch.log_softmax(sum(w * torch.log_softmax(z[n].double(), -1) for n, w in weights.items()), -1)
    torch.testing.assert_close(fast.double(), exact, atol=2e-5, rtol=0)
    with monkeypatch.context() as m:
        m.setattr(native, "kernels", lambda: None)
        torch.testing.assert_close(fast, C.static_log_probs(z, weights), atol=1e-6, rtol=0)
    recipe = presets.static("large", "small", ["e0", "e1", "e2"], [1.0, 0.5, 0.0])
    assert torch.equal(fuse(z, recipe).logprobs.argmax(-1), fuse(z, recipe, support="dense").logprobs.argmax(-1))
    for name in z:
        broken = dict(z)
        broken[name] = z[name].clone()
        broken[name][3, 5] = float("nan")
        assert C.static_log_probs(broken, weights) is None, name
    with pytest.raises(ValueError, match=r"logits\['e2'\]: row 3 holds NaN or \+inf"):
        fuse(broken, recipe)  # the dense path names the model


def test_the_kernels_exp_is_accurate_to_float64_over_its_range():
    kern = native.kernels()
    assert kern is not None
    x = torch.cat([torch.linspace(-700, 700, 200001, dtype=torch.float64),
                   torch.randn(100000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3])
    out = torch.empty_like(x)
    kern.lib.lf_exp_check(x.numel(), x.data_ptr(), out.data_ptr())
    rel = ((out - x.exp()) / x.exp()).abs()
    assert float(rel.max()) < 1e-13 and float(rel[200001:].max()) < 1e-15, (float(rel.max()), float(rel[200001:].max()))
