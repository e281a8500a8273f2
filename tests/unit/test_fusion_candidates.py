"""The fast path of fuse(): the certified candidate support (docs/algorithms.md §4), the one-pass static fusion and the
NaN guard, each checked against the dense reference path (fuse(..., support="dense")) and a float64 reference."""

from __future__ import annotations

from dataclasses import replace

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfusion.fusion import Recipe, dlf_loss, fuse, presets
from logitfusion.fusion import candidates as C
from logitfusion.fusion import dlf as D
from logitfusion.fusion import native
from logitfusion.fusion import recipe as recipe_module

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
NEG_INF = float("-inf")


def peaked_logits(seed: int, B: int, V: int, T: int, *, top: float = 30.0, bulk: float = 2.0, head: int = 8,
                  spread: float = 0.5, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """LM-like raw logits: a few head tokens high above a Gaussian bulk; the small model near the large one, each
    expert near the small one. Keys: large, small, e0..e{T-1}."""
    g = torch.Generator().manual_seed(seed)
    large = torch.randn(B, V, generator=g, dtype=dtype) * bulk
    ids = torch.randint(0, V, (B, head), generator=g)
    large.scatter_(1, ids, top + 3 * torch.randn(B, head, generator=g, dtype=dtype))
    small = large + torch.randn(B, V, generator=g, dtype=dtype) * 0.7
    out = {"large": large, "small": small}
    for t in range(T):
        out[f"e{t}"] = small + torch.randn(B, V, generator=g, dtype=dtype) * spread + 5.0 * t  # offsets: raw logits
    return out


def dlf(T: int, solver: str, max_alpha: float = 2.0) -> Recipe:
    return presets.dlf("large", "small", [f"e{t}" for t in range(T)], solver=solver, max_alpha=max_alpha)


def ref_loss(z: dict[str, torch.Tensor], T: int, alphas: torch.Tensor) -> torch.Tensor:
    """The float64 DLF objective of the whole vocabulary at alphas [B, T]."""
    lp = {n: torch.log_softmax(x.double(), -1) for n, x in z.items()}
    experts = torch.stack([lp[f"e{t}"] for t in range(T)])
    return dlf_loss(lp["large"], lp["small"], experts, alphas.double())


# ---------------------------------------------------------------------------------------------------------------
# The bound itself


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), V=st.integers(5, 300), T=st.integers(1, 3),
       bulk=st.floats(0.5, 6.0), spread=st.floats(0.1, 3.0), max_alpha=st.sampled_from([0.5, 2.0, 4.0]),
       eps=st.sampled_from([1e-3, 1e-1]))
def test_dropped_tokens_carry_at_most_exp_minus_tau_under_every_alpha(seed, B, V, T, bulk, spread, max_alpha, eps):
    # A loose eps so that tokens really are dropped at these small V; the claim is checked at random alphas in the
    # box and at all its corners (where the linear fused logits take their extremes).
    z = peaked_logits(seed, B, V, T, top=8.0, bulk=bulk, spread=spread)
    maxes = {n: x.amax(-1) for n, x in z.items()}
    d = torch.empty(T, B, V, dtype=torch.float64)
    scratch = [torch.empty(B, V, dtype=torch.float64) for _ in range(3)]
    C.dlf_dense_pass(z["small"], [z[f"e{t}"] for t in range(T)], maxes["small"],
                     [maxes[f"e{t}"] for t in range(T)], d, scratch)
    tau = C.tau_for(V, eps)
    keep = C.candidate_mask(z["large"], d, max_alpha, tau, scratch)
    assert keep.any(-1).all()
    corners = torch.cartesian_prod(*[torch.tensor([0.0, max_alpha], dtype=torch.float64)] * T).reshape(-1, T)
    rand = torch.rand(16, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * max_alpha
    lp = {n: torch.log_softmax(x, -1) for n, x in z.items()}
    deltas = torch.stack([lp[f"e{t}"] - lp["small"] for t in range(T)])  # [T, B, V]
    for alpha in torch.cat([corners, rand]):
        fused = torch.log_softmax(lp["large"] + torch.einsum("t,tbv->bv", alpha, deltas), -1)  # [B, V]
        assert (fused[~keep] <= -tau + 1e-9).all()
        dropped = fused.exp().masked_fill(keep, 0.0).sum(-1)
        assert (dropped <= eps * (1 + 1e-9)).all()
    assert (lp["large"][~keep] <= -tau + 1e-9).all()  # alpha = 0: the large base itself


def test_tau_is_ln_v_over_eps_and_options_are_checked():
    assert C.tau_for(128256, 1e-9) == pytest.approx(math.log(128256 / 1e-9))
    assert 32.4 < C.tau_for(128256, C.DEFAULT_EPS) < 32.5
    z = peaked_logits(0, 1, 20, 1)
    with pytest.raises(ValueError, match="support='fast': must be one of auto, dense, candidates"):
        fuse(z, dlf(1, "grid"), support="fast")
    with pytest.raises(ValueError, match=r"eps=0.0: must be finite and in \(0, 1\)"):
        fuse(z, dlf(1, "grid"), eps=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Exactness against the dense solve


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("solver", ["grid", "newton", "joint"])
def test_candidate_solve_matches_the_dense_solve_in_float64(T, solver):
    z = peaked_logits(10 + T, B=6, V=3000, T=T)
    recipe = dlf(T, solver)
    fast = fuse(z, recipe, support="candidates")
    dense = fuse(z, recipe, support="dense")
    assert (fast.support_size < 3000).all() and fast.support_size.min() < 300  # the support really is small
    torch.testing.assert_close(fast.alphas, dense.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.loss, dense.loss, atol=1e-12, rtol=1e-8)
    torch.testing.assert_close(fast.logprobs.exp(), dense.logprobs.exp(), atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("solver", ["grid", "newton", "joint"])
@pytest.mark.parametrize("seed", [20, 23, 25])
def test_fp32_candidate_solve_matches_the_float64_dense_solve(T, solver, seed):
    # fp32 logits; the reference is the dense solve of the same logits in float64. The fp32 dense solve itself
    # wobbles (1e-5..1e-4 in alpha for grid / newton, up to 0.2 for joint, whose objective is flat and non-convex);
    # the candidate problem is solved in float64, so it sits much closer to the reference.
    z = peaked_logits(seed, B=8, V=4000, T=T, dtype=torch.float32)
    recipe = dlf(T, solver)
    fast = fuse(z, recipe, support="candidates")
    dense = fuse(z, recipe, support="dense")
    ref = fuse({n: x.double() for n, x in z.items()}, recipe, support="dense")
    lf, ld, lr = (ref_loss(z, T, r.alphas) for r in (fast, dense, ref))
    assert torch.equal(fast.logprobs.argmax(-1), dense.logprobs.argmax(-1))
    torch.testing.assert_close(fast.loss.double(), lf, rtol=1e-4, atol=1e-7)  # the reported loss is the true one
    if solver == "grid":
        assert torch.equal(fast.alphas, dense.alphas)
        torch.testing.assert_close(fast.alphas.double(), ref.alphas, atol=1e-6, rtol=0)  # the same grid points
    elif solver == "newton":
        torch.testing.assert_close(fast.alphas.double(), ref.alphas, atol=1e-4, rtol=0)
        assert (lf <= lr * (1 + 1e-6) + 1e-12).all(), (lf, lr)
    else:
        assert (lf <= torch.maximum(ld, lr) * (1 + 1e-5) + 1e-12).all(), (lf, ld, lr)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), V=st.integers(2, 200), T=st.integers(1, 3),
       top=st.floats(0.0, 40.0), bulk=st.floats(0.1, 5.0), spread=st.floats(0.05, 2.0),
       solver=st.sampled_from(["grid", "newton", "joint"]), max_alpha=st.sampled_from([0.7, 2.0]))
def test_auto_and_candidates_agree_with_dense_on_random_problems(seed, B, V, T, top, bulk, spread, solver, max_alpha):
    z = peaked_logits(seed, B, V, T, top=top, bulk=bulk, spread=spread)
    recipe = dlf(T, solver, max_alpha)
    dense = fuse(z, recipe, support="dense")
    for support in ("auto", "candidates"):
        res = fuse(z, recipe, support=support)
        lf, ld = ref_loss(z, T, res.alphas), ref_loss(z, T, dense.alphas)
        assert (lf <= ld * (1 + 1e-6) + 1e-12).all(), (support, lf, ld)
        assert torch.isfinite(res.logprobs).all() and torch.isfinite(res.alphas).all()
        assert ((res.alphas >= 0) & (res.alphas <= max_alpha)).all()
        assert ((res.support_size >= 1) & (res.support_size <= V)).all()


def exact_curves_only(monkeypatch) -> None:
    """Make binned line curves never pay and keep the native kernels out (test_fusion_native.py checks those), so
    the dense fallback is the reference's arithmetic op for op."""
    monkeypatch.setattr(D, "_BIN_PAYS", 1 << 40)
    monkeypatch.setattr(native, "kernels", lambda: None)


@pytest.mark.parametrize("binned", [False, True])
def test_flat_rows_fall_back_to_the_dense_solve_row_by_row(binned, monkeypatch):
    # Rows 0 and 2 are flat (every token within tau of the top: the bound cannot separate), rows 1 and 3 peaked.
    # Their solve runs on the binned line curves where those pay (binned), else it is the reference, bit for bit.
    if not binned:
        exact_curves_only(monkeypatch)
    V = 2000
    z = peaked_logits(3, B=4, V=V, T=2)
    g = torch.Generator().manual_seed(4)
    for row in (0, 2):
        flat = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
        z["large"][row], z["small"][row] = flat, flat + 0.05 * torch.randn(V, generator=g, dtype=torch.float64)
        for t in range(2):
            z[f"e{t}"][row] = z["small"][row] + 0.3 * torch.randn(V, generator=g, dtype=torch.float64)
    recipe = dlf(2, "newton")
    res = fuse(z, recipe)  # auto
    dense = fuse(z, recipe, support="dense")
    assert res.support_size[0] == V and res.support_size[2] == V
    assert res.support_size[1] < V // 4 and res.support_size[3] < V // 4
    torch.testing.assert_close(res.alphas, dense.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.logprobs.exp(), dense.logprobs.exp(), atol=1e-9, rtol=1e-6)
    whole = fuse({n: x[[0, 2]] for n, x in z.items()}, recipe)  # every row flat: the whole batch dense
    assert (whole.support_size == V).all()
    if binned:  # the bound of dlf.BinnedLines: the loss within 1e-9 relative of the exact solve's
        torch.testing.assert_close(res.loss[[0, 2]], dense.loss[[0, 2]], rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(whole.alphas, dense.alphas[[0, 2]], atol=1e-6, rtol=0)
        return
    for row in (0, 2):  # a row that falls back is the reference's arithmetic: bit for bit
        assert torch.equal(res.alphas[row], dense.alphas[row]) and torch.equal(res.loss[row], dense.loss[row])
        assert torch.equal(res.logprobs[row], dense.logprobs[row])
    assert torch.equal(whole.alphas, dense.alphas[[0, 2]]) and torch.equal(whole.logprobs, dense.logprobs[[0, 2]])


@pytest.mark.parametrize("solver", ["grid", "newton", "joint"])
def test_fp32_rows_that_fall_back_equal_the_reference_bit_for_bit(solver, monkeypatch):
    # Near-flat fp32 logits (every token within tau: what randomly initialised models give); the dense rows are
    # solved two at a time here, so the chunking itself is checked too.
    monkeypatch.setattr(C, "_DENSE_SOLVE_BYTES", 2 * 3000 * 4 * 2)
    exact_curves_only(monkeypatch)
    g = torch.Generator().manual_seed(15)
    z = {n: 0.3 * torch.randn(5, 3000, generator=g) for n in ("large", "small", "e0", "e1")}
    res = fuse(z, dlf(2, solver))
    ref = fuse(z, dlf(2, solver), support="dense")
    assert (res.support_size == 3000).all()
    assert torch.equal(res.alphas, ref.alphas) and torch.equal(res.loss, ref.loss)
    assert torch.equal(res.logprobs, ref.logprobs)


@pytest.mark.parametrize("solver", ["grid", "newton", "joint"])
def test_masked_tokens_take_the_dense_path_and_stay_masked(solver):
    z = peaked_logits(5, B=3, V=500, T=2, dtype=torch.float32)
    z["e1"][1, 7] = NEG_INF
    z["large"][2, 100:110] = NEG_INF
    res = fuse(z, dlf(2, solver))
    dense = fuse(z, dlf(2, solver), support="dense")
    assert torch.equal(res.alphas, dense.alphas) and torch.equal(res.logprobs, dense.logprobs)
    assert torch.isneginf(res.logprobs[1, 7]) and torch.isneginf(res.logprobs[2, 100:110]).all()
    assert res.support_size.tolist() == [500, 499, 490]  # the joint support, solved densely


def test_experts_equal_to_small_give_alpha_zero_on_the_candidates():
    z = peaked_logits(6, B=3, V=1000, T=1)
    z["e0"] = z["small"].clone()
    res = fuse(z, dlf(1, "joint"), support="candidates")
    assert torch.equal(res.alphas, torch.zeros(3, 1, dtype=torch.float64))
    assert (res.loss.abs() < 1e-20).all()


def test_an_empty_batch_gives_empty_results():
    z = {n: torch.zeros(0, 9) for n in ("large", "small", "e0")}
    for recipe in (presets.proxy_tuning("large", "small", "e0"), dlf(1, "joint")):
        res = fuse(z, recipe)
        assert res.logprobs.shape == (0, 9) and res.alphas.shape == (0, 1)


def test_a_single_token_vocabulary_and_a_single_candidate():
    z = {n: torch.zeros(2, 1) for n in ("large", "small", "e0")}
    res = fuse(z, dlf(1, "newton"), support="candidates")
    assert torch.equal(res.logprobs, torch.zeros(2, 1)) and torch.equal(res.alphas, torch.zeros(2, 1))
    # One token of the large model far above everything: Pt = P on the support whatever alpha, so the loss is flat
    # (the targets, from small models that disagree with each other, cannot be met) and the grid keeps alpha 0.
    z = peaked_logits(7, B=2, V=400, T=1, top=200.0, head=1)
    z["small"], z["e0"] = peaked_logits(8, B=2, V=400, T=0, top=3.0)["large"], peaked_logits(9, 2, 400, 0)["large"]
    res = fuse(z, dlf(1, "grid"), support="candidates")
    dense = fuse(z, dlf(1, "grid"), support="dense")
    assert res.support_size.tolist() == [1, 1]
    assert torch.equal(res.alphas, torch.zeros(2, 1, dtype=torch.float64)) and torch.equal(res.alphas, dense.alphas)
    assert (res.loss > 0.1).all()
    torch.testing.assert_close(res.loss, dense.loss, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The static fast path


def _static_recipes() -> list[Recipe]:
    return [
        presets.single("large"),
        presets.proxy_tuning("large", "small", "e0", alpha=1.5),
        presets.proxy_tuning("large", "small", "e0", alpha=0.0),
        presets.static("large", "small", ["e0", "e1", "e2"], [0.5, 2.0, 1.0]),
        presets.eft_up("large", "small", "e0", beta=3.0),
        presets.eft_down("small", "large", "e1"),
        presets.lambda_interp("large", "small", "e0", "e1", 0.3),
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_static_fast_path_equals_the_dense_formula(dtype):
    z = {n: x.to(dtype) for n, x in peaked_logits(8, B=5, V=3001, T=3, dtype=torch.float32).items()}
    for recipe in _static_recipes():
        fast = fuse(z, recipe)
        dense = fuse(z, recipe, support="dense")
        assert fast.logprobs.dtype == dense.logprobs.dtype and fast.loss is None and fast.support_size is None
        tol = dict(atol=1e-12, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(fast.logprobs.exp(), dense.logprobs.exp(), **tol)
        assert torch.equal(fast.alphas, dense.alphas)
        top2 = dense.logprobs.double().topk(2, -1).values
        clear = top2[:, 0] - top2[:, 1] > 1e-4  # bf16 logits tie exactly often; a tie may break either way
        assert torch.equal(fast.logprobs.argmax(-1)[clear], dense.logprobs.argmax(-1)[clear]), recipe.name


def test_static_fast_path_keeps_precision_at_large_logit_offsets():
    z = peaked_logits(9, B=3, V=1000, T=1, dtype=torch.float32)
    shifted = {n: x + 60.0 for n, x in z.items()}
    recipe = presets.proxy_tuning("large", "small", "e0", alpha=1.5)
    want = fuse({n: x.double() for n, x in shifted.items()}, recipe).logprobs
    got = fuse(shifted, recipe).logprobs
    top = want.exp() > 1e-3
    torch.testing.assert_close(got.double()[top], want[top], atol=2e-6, rtol=0)  # log-prob error near the top


# ---------------------------------------------------------------------------------------------------------------
# The guard: NaN / +inf / dead rows still get the dense path's precise errors


@pytest.mark.parametrize("V", [7, 37, 1000])
@pytest.mark.parametrize("recipe", [presets.proxy_tuning("large", "small", "e0"), dlf(1, "newton")],
                         ids=["static", "dlf"])
def test_nan_or_inf_anywhere_names_the_model_and_row(V, recipe):
    z = peaked_logits(11, B=3, V=V, T=1, dtype=torch.float32)
    for pos in sorted({0, V // 2, V - 1}):
        for bad in (float("nan"), float("inf")):
            x = z["e0"].clone()
            x[2, pos] = bad
            for r in (recipe, replace(recipe, name="unvalidated")):  # a trusted recipe and an unchecked copy
                with pytest.raises(ValueError, match=r"logits\['e0'\]: row 2 holds NaN or \+inf"):
                    fuse({**z, "e0": x}, r)
    dead = z["small"].clone()
    dead[1] = NEG_INF
    with pytest.raises(ValueError, match=r"logits\['small'\]: row 1 masks every token"):
        fuse({**z, "small": dead}, recipe)


def test_the_guard_flags_every_non_finite_case_in_every_chunk(monkeypatch):
    monkeypatch.setattr(C, "_CHUNK_BYTES", 2 * 50 * 4)  # two rows per chunk: the guard is taken chunk by chunk
    x = torch.zeros(5, 50)
    assert C.static_log_probs({"m": x, "n": x}, {"m": 1.0, "n": 0.0}) is not None
    for value in (float("nan"), float("inf"), NEG_INF):
        for row in (0, 3, 4):
            for pos in (0, 17, 49):
                y = x.clone()
                y[row, pos] = value
                assert C.static_log_probs({"m": x, "n": y}, {"m": 1.0, "n": 0.0}) is None, (value, row, pos)
                out = C.fuse_dlf_fast({"l": x, "s": x, "e": y}, "l", "s", ["e"], "grid", 2.0, "auto", 1e-9)
                assert out is None, (value, row, pos)


def test_a_trusted_recipe_skips_only_the_recipe_check(monkeypatch):
    calls = []
    real = Recipe.validate
    monkeypatch.setattr(Recipe, "validate", lambda self: (calls.append(self.name), real(self))[1])
    z = peaked_logits(12, B=2, V=50, T=1, dtype=torch.float32)
    recipe = presets.dlf("large", "small", ["e0"], solver="grid")  # validated by the preset: trusted
    calls.clear()
    fuse(z, recipe)
    assert calls == []
    fuse(z, replace(recipe, name="copy"))  # a copy is unchecked until validated
    assert calls == ["copy"]
    with pytest.raises(ValueError, match="missing model 'e0'"):  # the logits are checked either way
        fuse({n: x for n, x in z.items() if n != "e0"}, recipe)


def test_fuse_dense_is_the_old_reference_path():
    z = peaked_logits(13, B=2, V=64, T=2, dtype=torch.float32)
    recipe = dlf(2, "joint")
    a = recipe_module.fuse_dense(z, recipe)
    b = fuse(z, recipe, support="dense")
    assert torch.equal(a.alphas, b.alphas) and torch.equal(a.logprobs, b.logprobs)


# ---------------------------------------------------------------------------------------------------------------
# Greedy decoding on the tiny model family: token-identical to the dense reference


GREEDY_RECIPES = {
    "proxy": presets.proxy_tuning("large", "small", "expert_a"),
    "static": presets.static("large", "small", ["expert_a", "expert_b"], [0.7, 1.2]),
    "dlf_grid": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="grid"),
    "dlf_newton": presets.dlf("large", "small", ["expert_a"], solver="newton"),
    "dlf_joint": presets.dlf("large", "small", ["expert_a", "expert_b"], solver="joint"),
}


@pytest.mark.parametrize("kind", sorted(GREEDY_RECIPES))
def test_greedy_decode_is_token_identical_to_the_dense_reference(models, kind, monkeypatch):
    from logitfusion.engine import reference
    from logitfusion.engine.testing import TINY_VOCAB_SIZE

    recipe = GREEDY_RECIPES[kind]
    prompt = [5, 17, 33, 2, 60]
    runs = {}
    for support in ("dense", "candidates", "auto"):
        monkeypatch.setattr(reference, "fuse", lambda lg, r, w=None, s=support, **_: fuse(lg, r, w, support=s))
        runs[support] = reference.naive_decode(models, prompt, recipe, vocab_size=TINY_VOCAB_SIZE, max_new_tokens=8)
    for support in ("candidates", "auto"):
        assert runs[support].token_ids == runs["dense"].token_ids, support
        np.testing.assert_allclose(runs[support].weights, runs["dense"].weights, atol=2e-3 if kind == "dlf_joint"
                                   else 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Sampling: the trusted path draws the same tokens without the per-step scan


def test_unchecked_sampling_draws_the_same_tokens():
    from logitfusion.fusion import SamplingParams, make_generator, sample, to_probs

    lp = fuse(peaked_logits(14, B=4, V=300, T=1, dtype=torch.float32), dlf(1, "newton")).logprobs
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=1),
              SamplingParams(temperature=1.3, top_p=0.9, seed=2), SamplingParams(temperature=1.0, seed=3)]
    checked = sample(lp, params, [make_generator(p) for p in params])
    unchecked = sample(lp, params, [make_generator(p) for p in params], check=False)
    assert torch.equal(checked, unchecked)
    assert torch.equal(to_probs(lp, params), to_probs(lp, params, check=False))
    greedy = [SamplingParams()] * 4
    assert torch.equal(sample(lp, greedy, [None] * 4, check=False), lp.argmax(-1))
    with pytest.raises(ValueError, match="params: 3 entries for a batch of 4 rows"):
        sample(lp, greedy[:3], [None] * 3, check=False)
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="logprobs: holds NaN"):  # the checked path still scans
        sample(bad, greedy, [None] * 4)
