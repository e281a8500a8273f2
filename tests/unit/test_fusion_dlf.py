"""DLF objective and solvers: against an independent float64 reference, and the properties the solvers promise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfusion.fusion import dlf_loss, solve_alphas
from logitfusion.fusion import dlf as D

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# An independent reference: numpy float64, one row at a time, KL as direct sums over the joint support.


def _norm(l: np.ndarray) -> np.ndarray:
    top = l.max()
    return l - (top + np.log(np.exp(l - top).sum()))


def _kl(la: np.ndarray, lb: np.ndarray) -> float:
    return float((np.exp(la) * (la - lb)).sum())


def ref_row_loss(lL, lS, lEs, alphas) -> float:
    """lL, lS: [V]; lEs: [T, V] (any log-scale scores, -inf masked); alphas: [T]."""
    lL, lS, lEs = (np.asarray(x, dtype=np.float64) for x in (lL, lS, lEs))
    keep = np.isfinite(lL) & np.isfinite(lS) & np.isfinite(lEs).all(0)
    P, Q = _norm(lL[keep]), _norm(lS[keep])
    Qs = [_norm(e[keep]) for e in lEs]
    Pt = _norm(P + sum(float(a) * (q - Q) for a, q in zip(alphas, Qs)))
    return sum((_kl(Pt, P) - _kl(q, Q)) ** 2 + (_kl(P, Pt) - _kl(Q, q)) ** 2 for q in Qs)


def ref_loss(lL, lS, lEs, alphas) -> np.ndarray:
    """Batched wrapper: [B, V], [B, V], [T, B, V], [B, T] -> [B]."""
    lL, lS, lEs, alphas = (torch.as_tensor(x).double().numpy() for x in (lL, lS, lEs, alphas))
    return np.array([ref_row_loss(lL[b], lS[b], lEs[:, b], alphas[b]) for b in range(lL.shape[0])])


# ---------------------------------------------------------------------------------------------------------------
# Random problems


def make_problem(seed: int, B: int, T: int, V: int, scale: float, spread: float, mask_rate: float = 0.0):
    """fp32 log-probs: large, small [B, V]; experts [T, B, V] near the small model; optional random -inf masks."""
    g = torch.Generator().manual_seed(seed)
    lL = torch.log_softmax(torch.randn(B, V, generator=g) * scale, -1)
    lS = torch.log_softmax(torch.randn(B, V, generator=g) * scale, -1)
    lE = torch.log_softmax(lS + torch.randn(T, B, V, generator=g) * spread, -1)
    if mask_rate > 0:
        for x in (lL, lS, *lE):
            m = torch.rand(B, V, generator=g) < mask_rate
            m[:, 0] = False  # token 0 always survives, so every row keeps a support
            x.masked_fill_(m, NEG_INF)
    return lL, lS, lE


problems = st.builds(
    make_problem,
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 4),
    T=st.just(1),
    V=st.integers(2, 80),
    scale=st.floats(0.1, 5.0),
    spread=st.floats(0.05, 3.0),
)
multi_problems = st.builds(
    make_problem,
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    T=st.integers(2, 3),
    V=st.integers(2, 60),
    scale=st.floats(0.1, 5.0),
    spread=st.floats(0.05, 3.0),
)


def close_or_below(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x <= y up to float32 rounding of the solver's own loss evaluations."""
    return x <= y + 1e-6 + 1e-5 * np.abs(y)


# ---------------------------------------------------------------------------------------------------------------
# The objective


@SETTINGS
@given(data=multi_problems, alpha_seed=st.integers(0, 1000))
def test_dlf_loss_matches_the_float64_reference(data, alpha_seed):
    lL, lS, lE = data
    alphas = torch.rand(lL.shape[0], lE.shape[0], generator=torch.Generator().manual_seed(alpha_seed)) * 2
    got = dlf_loss(lL, lS, lE, alphas).numpy()
    want = ref_loss(lL, lS, lE, alphas)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
    got64 = dlf_loss(lL.double(), lS.double(), lE.double(), alphas.double()).numpy()
    np.testing.assert_allclose(got64, want, rtol=1e-9, atol=1e-12)


def test_dlf_loss_at_zero_is_the_sum_of_squared_targets():
    lL, lS, lE = make_problem(3, B=2, T=2, V=17, scale=2.0, spread=1.0)
    loss = dlf_loss(lL.double(), lS.double(), lE.double(), torch.zeros(2, 2, dtype=torch.float64))
    lS64, lE64 = lS.double(), lE.double()
    a = (lE64.exp() * (lE64 - lS64)).sum(-1)  # [T, B]
    b = (lS64.exp() * (lS64 - lE64)).sum(-1)
    torch.testing.assert_close(loss, (a.square() + b.square()).sum(0))


def test_single_expert_derivatives_match_finite_differences():
    lL, lS, lE = (x.double() for x in make_problem(5, B=3, T=1, V=40, scale=2.0, spread=1.0))
    pb = D.problem_from_log_probs(lL, lS, lE)
    x = torch.tensor([[0.3, 0.9, 1.7]], dtype=torch.float64)  # [T, B]
    h = 1e-5
    c, cp, cm = (D.line_curve(pb, x + d, derivs=True) for d in (0.0, h, -h))
    for f, df in (("A", "dA"), ("B", "dB"), ("dA", "d2A"), ("dB", "d2B")):
        fd = (getattr(cp, f) - getattr(cm, f)) / (2 * h)
        torch.testing.assert_close(getattr(c, df), fd, rtol=1e-6, atol=1e-8)


def test_joint_gradient_and_hessian_match_finite_differences():
    lL, lS, lE = (x.double() for x in make_problem(6, B=2, T=3, V=30, scale=2.0, spread=1.0))
    pb = D.problem_from_log_probs(lL, lS, lE)
    alphas = torch.tensor([[0.4, 1.1, 0.2], [1.5, 0.3, 0.8]], dtype=torch.float64)
    j = D.joint_terms(pb, alphas, derivs=True)
    h = 1e-5
    for t in range(3):
        e = torch.zeros_like(alphas)
        e[:, t] = h
        jp, jm = D.joint_terms(pb, alphas + e, True), D.joint_terms(pb, alphas - e, True)
        torch.testing.assert_close(j.grad[:, t], (jp.loss - jm.loss) / (2 * h), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(j.hess[:, :, t], (jp.grad - jm.grad) / (2 * h), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Solvers


@SETTINGS
@given(data=problems)
def test_newton_is_within_a_grid_step_of_grid_and_never_worse(data):
    lL, lS, lE = data
    ag, lg = solve_alphas(lL, lS, lE, "grid")
    an, ln = solve_alphas(lL, lS, lE, "newton")
    assert (an - ag).abs().max() <= 0.1 + 1e-6
    ref_g, ref_n = ref_loss(lL, lS, lE, ag), ref_loss(lL, lS, lE, an)
    assert close_or_below(ref_n, ref_g).all(), (ref_n, ref_g)
    assert close_or_below(ln.numpy(), lg.numpy()).all()


@SETTINGS
@given(data=multi_problems)
def test_multi_expert_newton_and_joint_never_above_the_papers_mode(data):
    lL, lS, lE = data
    results = {s: solve_alphas(lL, lS, lE, s) for s in ("grid", "newton", "joint")}
    ref = {s: ref_loss(lL, lS, lE, a) for s, (a, _) in results.items()}
    assert close_or_below(ref["newton"], ref["grid"]).all()
    assert close_or_below(ref["joint"], ref["newton"]).all()
    assert close_or_below(ref["joint"], ref["grid"]).all()
    for s in ("grid", "newton"):  # the paper's mode: exactly one expert active (or none)
        assert ((results[s][0] > 0).sum(-1) <= 1).all()
    for s, (alphas, loss) in results.items():
        assert ((alphas >= 0) & (alphas <= 2.0)).all(), s
        np.testing.assert_allclose(loss.numpy(), ref[s], rtol=1e-3, atol=1e-5)


def test_grid_reports_exactly_grid_values_and_its_own_minimum():
    lL, lS, lE = make_problem(11, B=4, T=1, V=50, scale=2.0, spread=1.0)
    alphas, loss = solve_alphas(lL, lS, lE, "grid")
    assert torch.allclose(alphas * 10, (alphas * 10).round(), atol=1e-5)
    pts = np.round(np.arange(21) * 0.1, 10)
    for b in range(4):
        scan = [ref_row_loss(lL[b], lS[b], lE[:, b], [a]) for a in pts]
        assert ref_row_loss(lL[b], lS[b], lE[:, b], [float(alphas[b, 0])]) <= min(scan) + 1e-6 + 1e-5 * min(scan)


def test_newton_finds_the_continuous_optimum_between_grid_points():
    lL, lS, lE = (x.double() for x in make_problem(11, B=4, T=1, V=50, scale=2.0, spread=1.0))
    an, ln = solve_alphas(lL, lS, lE, "newton")
    # A fine scan of the reference: newton is at least as good as every point of it, to rounding.
    fine = np.linspace(0.0, 2.0, 2001)
    for b in range(4):
        scan = np.array([ref_row_loss(lL[b], lS[b], lE[:, b], [a]) for a in fine])
        assert ln[b].item() <= scan.min() + 1e-9
    _, lg = solve_alphas(lL, lS, lE, "grid")
    assert (ln < lg).any()  # off-grid optima exist here, so the test can tell newton from grid


def _bimodal_row():
    """A row whose one-expert loss has two local minima (targets of several nats): searched once, seeded."""
    for seed in range(200):
        lL, lS, lE = (x.double() for x in make_problem(seed, B=1, T=1, V=30, scale=6.0, spread=4.0))
        xs = torch.linspace(0, 2, 201, dtype=torch.float64)
        pb = D.problem_from_log_probs(lL, lS, lE)
        c = D.line_curve(pb, xs[:, None, None], derivs=False)
        f = D.targets_loss(c.A, c.B, pb.a, pb.b)[:, 0, 0]  # [201]
        interior = (f[1:-1] < f[:-2]) & (f[1:-1] < f[2:])
        if int(interior.sum()) + int(f[-1] < f[-2]) >= 2:
            return lL, lS, lE
    raise AssertionError("no bimodal example found")


def test_newton_is_not_fooled_by_a_second_local_minimum():
    lL, lS, lE = _bimodal_row()
    ag, lg = solve_alphas(lL, lS, lE, "grid")
    an, ln = solve_alphas(lL, lS, lE, "newton")
    assert abs(an.item() - ag.item()) <= 0.1 + 1e-9
    assert ln.item() <= lg.item() + 1e-12


@pytest.mark.parametrize("solver", D.SOLVERS)
def test_experts_equal_to_small_give_alpha_exactly_zero(solver):
    lL, lS, _ = make_problem(2, B=3, T=1, V=25, scale=2.0, spread=1.0)
    lE = torch.stack([lS.clone(), lS.clone()])
    alphas, loss = solve_alphas(lL, lS, lE, solver)
    assert torch.equal(alphas, torch.zeros(3, 2))
    assert torch.equal(loss, torch.zeros(3))


@pytest.mark.parametrize("solver", D.SOLVERS)
def test_an_identical_expert_gets_zero_and_the_other_expert_moves(solver):
    lL, lS, lE1 = make_problem(4, B=3, T=1, V=25, scale=2.0, spread=1.0)
    lE = torch.cat([lS.unsqueeze(0), lE1])  # expert 0 equals the small model: its delta is zero
    alphas, loss = solve_alphas(lL, lS, lE, solver)
    assert torch.equal(alphas[:, 0], torch.zeros(3))
    assert (alphas[:, 1] > 0).all()
    np.testing.assert_allclose(loss.numpy(), ref_loss(lL, lS, lE, alphas), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("solver", D.SOLVERS)
def test_identical_distributions_everywhere_give_zero_and_no_nan(solver):
    lL = torch.log_softmax(torch.randn(2, 9, generator=torch.Generator().manual_seed(0)), -1)
    alphas, loss = solve_alphas(lL, lL, lL.unsqueeze(0), solver)
    assert torch.equal(alphas, torch.zeros(2, 1)) and torch.equal(loss, torch.zeros(2))


@pytest.mark.parametrize("solver", D.SOLVERS)
@pytest.mark.parametrize("max_alpha", [2.0, 0.75])
def test_a_target_out_of_reach_gives_the_bound(solver, max_alpha):
    # The expert moves the small model a lot; the large model is already sure, so Pt barely moves: KLs stay below
    # the targets for every alpha in range and the loss keeps falling up to the bound.
    lS = torch.tensor([[0.5, 0.5]]).log()
    lE = torch.tensor([[[0.99, 0.01]]]).log()
    lL = torch.tensor([[1 - 1e-6, 1e-6]]).log()
    alphas, loss = solve_alphas(lL, lS, lE, solver, max_alpha=max_alpha)
    assert alphas.item() == pytest.approx(max_alpha, abs=1e-6)
    assert math.isfinite(loss.item())


@SETTINGS
@given(data=st.builds(make_problem, seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), T=st.integers(1, 3),
                      V=st.integers(3, 40), scale=st.floats(0.1, 4.0), spread=st.floats(0.1, 2.0),
                      mask_rate=st.floats(0.05, 0.6)))
def test_masked_tokens_never_produce_nan(data):
    lL, lS, lE = data
    for solver in D.SOLVERS:
        alphas, loss = solve_alphas(lL, lS, lE, solver)
        assert torch.isfinite(alphas).all() and torch.isfinite(loss).all(), solver
        np.testing.assert_allclose(loss.numpy(), ref_loss(lL, lS, lE, alphas), rtol=1e-3, atol=1e-5)


@SETTINGS
@given(data=st.builds(make_problem, seed=st.integers(0, 2**31 - 1), B=st.integers(2, 5), T=st.integers(1, 2),
                      V=st.integers(2, 50), scale=st.floats(0.1, 4.0), spread=st.floats(0.1, 2.0),
                      mask_rate=st.sampled_from([0.0, 0.2])))
def test_rows_of_a_batch_are_solved_independently(data):
    lL, lS, lE = data
    for solver in D.SOLVERS:
        alphas, loss = solve_alphas(lL, lS, lE, solver)
        for b in range(lL.shape[0]):
            a1, l1 = solve_alphas(lL[b : b + 1], lS[b : b + 1], lE[:, b : b + 1], solver)
            torch.testing.assert_close(alphas[b : b + 1], a1, rtol=0, atol=1e-5)
            torch.testing.assert_close(loss[b : b + 1], l1, rtol=1e-5, atol=1e-7)


def test_grid_points_follow_max_alpha():
    assert D.grid_points(2.0, torch.float64, torch.device("cpu")).tolist() == [round(0.1 * i, 10) for i in range(21)]
    assert D.grid_points(0.25, torch.float64, torch.device("cpu")).tolist() == [0.0, 0.1, 0.2, 0.25]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "foo"}, "solver='foo': must be one of grid, newton, joint"),
        ({"solver": "grid", "max_alpha": float("nan")}, "max_alpha=nan: must be finite and in (0, 10.0]"),
        ({"solver": "grid", "max_alpha": 0.0}, "max_alpha=0.0: must be finite and in (0, 10.0]"),
    ],
)
def test_solve_alphas_rejects_bad_arguments(kwargs, message):
    lL, lS, lE = make_problem(0, B=1, T=1, V=5, scale=1.0, spread=1.0)
    with pytest.raises(ValueError) as e:
        solve_alphas(lL, lS, lE, **kwargs)
    assert str(e.value) == message


def test_bad_shapes_and_values_name_the_field():
    lL, lS, lE = make_problem(0, B=2, T=1, V=5, scale=1.0, spread=1.0)
    with pytest.raises(ValueError, match=r"l_experts: must have shape \[T, B, V\]"):
        solve_alphas(lL, lS, lE[0], "grid")
    with pytest.raises(ValueError, match="shapes differ"):
        solve_alphas(lL, lS[:1], lE, "grid")
    bad = lS.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="l_small: holds NaN"):
        solve_alphas(lL, bad, lE, "grid")
    with pytest.raises(ValueError, match=r"alphas: must be a tensor of shape \[B, T\] = \[2, 1\]"):
        dlf_loss(lL, lS, lE, torch.zeros(2))
    masked = lL.clone()
    masked[0, 1:] = NEG_INF
    lS2 = lS.clone()
    lS2[0, 0] = NEG_INF
    with pytest.raises(ValueError, match="row 0: no token is allowed by every model"):
        solve_alphas(masked, lS2, lE, "grid")


# ---------------------------------------------------------------------------------------------------------------
# Binned line curves (D.BinnedLines): the grid and newton solvers' curves from per-bin moments


def _random_problem(seed: int, T: int, B: int, V: int, scale: float, mask: bool = False) -> D.Problem:
    g = torch.Generator().manual_seed(seed)
    lL = torch.log_softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * scale, -1)
    lS = torch.log_softmax(torch.randn(B, V, generator=g, dtype=torch.float64) * scale, -1)
    lE = torch.stack([torch.log_softmax(lS + 0.5 * scale * torch.randn(B, V, generator=g, dtype=torch.float64), -1)
                      for _ in range(T)])
    if mask:
        lL[0, :50] = NEG_INF
        lE[-1, -1, 7] = NEG_INF
    return D.problem_from_log_probs(lL, lS, lE)


@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0])
@pytest.mark.parametrize("max_alpha", [0.5, 2.0, 10.0])
@pytest.mark.parametrize("mask", [False, True])
def test_binned_line_curves_equal_the_exact_curves_within_the_bound(scale, max_alpha, mask):
    pb = _random_problem(3, T=2, B=3, V=60000, scale=scale, mask=mask)
    lines = D.BinnedLines.maybe(pb, max_alpha)
    assert lines is not None  # 60,000 tokens into at most ~1,500 bins
    alpha = torch.rand(4, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * max_alpha
    alpha[0] = 0.0
    alpha[1] = max_alpha
    exact, binned = D.line_curve(pb, alpha, True), lines(alpha, True)
    assert D.truncation_bound() < 1e-8
    for name in ("A", "B", "dA", "d2A", "dB", "d2B"):
        e, b = getattr(exact, name), getattr(binned, name)
        assert ((b - e).abs() <= 1e-7 * (1.0 + e.abs())).all(), (name, float((b - e).abs().max()))
    assert torch.equal(binned.B[0], torch.zeros_like(binned.B[0]))  # g(0) = 0 exactly, as the exact curve


@pytest.mark.parametrize("solver", D.SOLVERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solvers_on_binned_curves_find_the_dense_solution(solver, seed):
    """Exactness target of the fast path: alphas within 1e-4 of the dense solve, or a loss within 1e-6 relative."""
    pb = _random_problem(seed, T=3, B=4, V=20000, scale=[0.5, 2.0, 4.0][seed])
    a_exact, l_exact = D.solve_problem(pb, solver, 2.0)
    a_bin, l_bin = D.solve_problem(pb, solver, 2.0, curves="auto")
    l_true = D.joint_terms(pb, a_bin, derivs=False).loss  # the binned solution's loss, evaluated exactly
    close = (a_bin - a_exact).abs().amax(-1) <= 1e-4
    as_good = l_true <= l_exact * (1 + 1e-6) + 1e-15
    assert (close | as_good).all(), (a_bin, a_exact, l_true, l_exact)
    torch.testing.assert_close(l_bin, l_true, rtol=1e-7, atol=1e-14)  # the reported loss is the true one


def test_binned_curves_are_used_only_where_they_pay():
    assert D.BinnedLines.maybe(_random_problem(0, T=1, B=2, V=200, scale=2.0), 2.0) is None  # too few tokens
    wide = _random_problem(0, T=1, B=2, V=3000, scale=2.0)
    assert D.BinnedLines.maybe(wide, 2.0) is not None and D.BinnedLines.maybe(wide, 10.0) is None  # 5x the bins
    with pytest.raises(ValueError, match=r"curves='bogus': must be one of exact, auto"):
        D.solve_problem(wide, "grid", 2.0, curves="bogus")
