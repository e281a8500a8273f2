"""Recipes, presets and fuse(): the formulas of docs/algorithms.md §2 and §3, masking, validation messages."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfusion.fusion import FusionResult, Recipe, dlf_loss, fuse, methods, presets, solve_alphas
from logitfusion.fusion import dlf as dlf_module
from logitfusion.fusion import recipe as recipe_module
from logitfusion.fusion.methods import SOLVERS, Choice

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
NEG_INF = float("-inf")
NAMES = ("large", "small", "ea", "eb", "large_ft")


def make_logits(seed: int, B: int, V: int, scale: float = 2.0, mask_rate: float = 0.0) -> dict[str, torch.Tensor]:
    """Raw logits per model (not normalised: fuse must apply log_softmax itself), optional random -inf masks."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in NAMES:
        z = torch.randn(B, V, generator=g) * scale + torch.randn(B, 1, generator=g) * 5  # a per-row offset
        if mask_rate > 0:
            m = torch.rand(B, V, generator=g) < mask_rate
            m[:, 0] = False
            z = z.masked_fill(m, NEG_INF)
        out[n] = z
    return out


logit_sets = st.builds(make_logits, seed=st.integers(0, 2**31 - 1), B=st.integers(1, 4), V=st.integers(2, 60),
                       scale=st.floats(0.1, 4.0))


def lsm(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z.double(), -1)


def assert_same_distribution(x: torch.Tensor, y: torch.Tensor) -> None:
    torch.testing.assert_close(x.double().exp(), y.double().exp(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The formulas


@SETTINGS
@given(z=logit_sets)
def test_alpha_zero_gives_the_large_base(z):
    base = lsm(z["large"])
    assert_same_distribution(fuse(z, presets.proxy_tuning("large", "small", "ea", alpha=0.0)).logprobs, base)
    assert_same_distribution(fuse(z, presets.static("large", "small", ["ea", "eb"], [0.0, 0.0])).logprobs, base)
    assert_same_distribution(fuse(z, presets.single("large")).logprobs, base)


@SETTINGS
@given(z=logit_sets, alpha=st.floats(0.0, 2.0))
def test_proxy_tuning_is_large_plus_alpha_times_the_expert_delta(z, alpha):
    want = torch.log_softmax(lsm(z["large"]) + alpha * (lsm(z["ea"]) - lsm(z["small"])), -1)
    res = fuse(z, presets.proxy_tuning("large", "small", "ea", alpha=alpha))
    assert_same_distribution(res.logprobs, want)
    assert res.alphas.shape == (z["large"].shape[0], 1) and bool((res.alphas == alpha).all())
    assert res.loss is None


@SETTINGS
@given(z=logit_sets)
def test_eft_up_scaling_equals_proxy_tuning_with_alpha_one(z):
    eft = fuse(z, presets.eft_up("large", "small", "ea"))
    proxy = fuse(z, presets.proxy_tuning("large", "small", "ea", alpha=1.0))
    assert_same_distribution(eft.logprobs, proxy.logprobs)
    assert eft.alphas.shape == (z["large"].shape[0], 0)


@SETTINGS
@given(z=logit_sets, beta=st.floats(0.0, 10.0))
def test_eft_beta_scales_the_base_delta_not_the_expert(z, beta):
    want = torch.log_softmax(lsm(z["ea"]) + beta * (lsm(z["large"]) - lsm(z["small"])), -1)
    assert_same_distribution(fuse(z, presets.eft_up("large", "small", "ea", beta=beta)).logprobs, want)


@SETTINGS
@given(z=logit_sets)
def test_eft_down_scaling(z):
    want = torch.log_softmax(lsm(z["small"]) + lsm(z["large_ft"]) - lsm(z["large"]), -1)
    assert_same_distribution(fuse(z, presets.eft_down("small", "large", "large_ft")).logprobs, want)


@SETTINGS
@given(z=logit_sets, lam=st.floats(0.0, 1.0))
def test_lambda_interpolation_and_its_endpoints(z, lam):
    L, S, A, B = (lsm(z[n]) for n in ("large", "small", "ea", "eb"))
    want = torch.log_softmax(L + lam * (A - S) + (1 - lam) * (B - S), -1)
    assert_same_distribution(fuse(z, presets.lambda_interp("large", "small", "ea", "eb", lam)).logprobs, want)
    one = fuse(z, presets.lambda_interp("large", "small", "ea", "eb", 1.0)).logprobs
    zero = fuse(z, presets.lambda_interp("large", "small", "ea", "eb", 0.0)).logprobs
    assert_same_distribution(one, fuse(z, presets.proxy_tuning("large", "small", "ea")).logprobs)
    assert_same_distribution(zero, fuse(z, presets.proxy_tuning("large", "small", "eb")).logprobs)


@SETTINGS
@given(z=logit_sets, solver=st.sampled_from(["grid", "newton", "joint"]))
def test_dlf_fuses_with_the_solved_alphas(z, solver):
    res = fuse(z, presets.dlf("large", "small", ["ea", "eb"], solver=solver))
    L, S = (torch.log_softmax(z[n], -1) for n in ("large", "small"))
    E = torch.stack([torch.log_softmax(z[n], -1) for n in ("ea", "eb")])
    alphas, loss = solve_alphas(L, S, E, solver)
    # solve_alphas renormalises the log-probs once more; the loss is flat at its minimum, so alpha may move ~1e-4
    torch.testing.assert_close(res.alphas, alphas, atol=1e-3, rtol=0)
    torch.testing.assert_close(res.loss, loss, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(res.loss, dlf_loss(L, S, E, res.alphas), atol=1e-6, rtol=1e-4)
    want = torch.log_softmax(L + torch.einsum("bt,tbv->bv", res.alphas, E - S), -1)
    assert_same_distribution(res.logprobs, want)


@SETTINGS
@given(z=logit_sets, shift=st.floats(-50.0, 50.0))
def test_raw_logits_and_shifted_logits_fuse_alike(z, shift):
    shifted = {n: x + shift for n, x in z.items()}
    for recipe in (presets.proxy_tuning("large", "small", "ea"), presets.eft_up("large", "small", "ea", beta=2.0)):
        assert_same_distribution(fuse(z, recipe).logprobs, fuse(shifted, recipe).logprobs)
    # DLF sees the same log-probs up to fp32 rounding; its loss is flat at the optimum, so alpha moves by ~1e-4.
    a, b = (fuse(x, presets.dlf("large", "small", ["ea"], solver="newton")) for x in (z, shifted))
    torch.testing.assert_close(a.alphas, b.alphas, atol=1e-3, rtol=0)
    torch.testing.assert_close(a.logprobs.exp(), b.logprobs.exp(), atol=1e-3, rtol=0)


def _all_recipes() -> list[Recipe]:
    return [
        presets.single("large"),
        presets.proxy_tuning("large", "small", "ea", alpha=1.5),
        presets.static("large", "small", ["ea", "eb"], [0.5, 2.0]),
        presets.eft_up("large", "small", "ea", beta=3.0),
        presets.eft_down("small", "large", "large_ft"),
        presets.lambda_interp("large", "small", "ea", "eb", 0.3),
        *(presets.dlf("large", "small", ["ea", "eb"], solver=s) for s in ("grid", "newton", "joint")),
    ]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), V=st.integers(2, 40), rate=st.floats(0.05, 0.7))
def test_masked_tokens_stay_masked_and_nothing_is_nan(seed, B, V, rate):
    z = make_logits(seed, B, V, mask_rate=rate)
    for recipe in _all_recipes():
        res = fuse(z, recipe)
        union = torch.zeros(B, V, dtype=torch.bool)
        for n in recipe.model_names():
            union |= torch.isneginf(z[n])
        assert not torch.isnan(res.logprobs).any(), recipe.name
        assert torch.equal(torch.isneginf(res.logprobs), union), recipe.name  # masked exactly where any model is
        assert torch.isfinite(res.logprobs[~union]).all()
        torch.testing.assert_close(res.logprobs.exp().sum(-1), torch.ones(B, dtype=torch.float32))
        assert torch.isfinite(res.alphas).all()
        assert res.loss is None or torch.isfinite(res.loss).all()


def test_a_token_masked_only_by_an_unread_model_is_not_masked():
    z = make_logits(1, 2, 8)
    z["eb"][:, 3] = NEG_INF
    res = fuse(z, presets.proxy_tuning("large", "small", "ea"))
    assert torch.isfinite(res.logprobs).all()


def test_static_fusion_with_masks_equals_the_formula_on_the_joint_support():
    z = make_logits(2, 2, 10)
    z["ea"][0, 4] = NEG_INF
    z["small"][1, 7] = NEG_INF
    res = fuse(z, presets.proxy_tuning("large", "small", "ea", alpha=0.7))
    keep = ~(torch.isneginf(z["ea"]) | torch.isneginf(z["small"]))
    for b in range(2):
        L, S, E = (torch.log_softmax(z[n][b, keep[b]].double(), -1) for n in ("large", "small", "ea"))
        want = torch.log_softmax(L + 0.7 * (E - S), -1)
        torch.testing.assert_close(res.logprobs[b, keep[b]].double(), want, rtol=1e-5, atol=1e-5)


def test_fuse_result_shapes_for_every_preset():
    z = make_logits(3, 3, 12)
    for recipe in _all_recipes():
        res = fuse(z, recipe)
        assert isinstance(res, FusionResult)
        assert res.logprobs.shape == (3, 12) and res.logprobs.dtype == torch.float32
        assert res.alphas.shape == (3, len(recipe.experts))
        assert (res.loss is None) == (recipe.solver is None)


def test_fuse_accepts_bfloat16_logits():
    z = {n: x.to(torch.bfloat16) for n, x in make_logits(4, 2, 16).items()}
    res = fuse(z, presets.dlf("large", "small", ["ea"]))
    assert res.logprobs.dtype == torch.float32 and torch.isfinite(res.logprobs).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: precise errors


def test_fuse_names_a_missing_model():
    z = make_logits(0, 1, 5)
    del z["ea"]
    with pytest.raises(ValueError, match="logits: missing model 'ea'"):
        fuse(z, presets.proxy_tuning("large", "small", "ea"))


def test_fuse_rejects_mismatched_shapes_nan_and_dead_rows():
    z = make_logits(0, 2, 5)
    recipe = presets.proxy_tuning("large", "small", "ea")
    with pytest.raises(ValueError, match=r"logits\['small'\]: shape \[2, 4\] differs from logits\['ea'\]"):
        fuse({**z, "small": z["small"][:, :4]}, recipe)
    nan = z["ea"].clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"logits\['ea'\]: row 1 holds NaN or \+inf"):
        fuse({**z, "ea": nan}, recipe)
    with pytest.raises(ValueError, match=r"logits\['large'\]: must have shape \[B, V\]"):
        fuse({**z, "large": z["large"][0]}, recipe)
    a, b = z["large"].clone(), z["small"].clone()
    a[0, :3] = NEG_INF
    b[0, 3:] = NEG_INF
    with pytest.raises(ValueError, match="logits: row 0 has no token allowed by every model"):
        fuse({**z, "large": a, "small": b}, recipe)
    dead = z["ea"].clone()
    dead[1] = NEG_INF
    with pytest.raises(ValueError, match=r"logits\['ea'\]: row 1 masks every token"):
        fuse({**z, "ea": dead}, recipe)


def _r(**kw) -> Recipe:
    base = dict(name="custom", coeffs=(("large", 1.0),), experts=("ea",), small="small", alphas=(1.0,))
    base.update(kw)
    return Recipe(**base)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (_r(alphas=(1.0, float("nan"))), "alphas=(1.0, nan): has 2 entries for 1 experts; give one alpha per expert"),
        (_r(experts=("ea", "eb"), alphas=(1.0, float("nan"))), "alphas[1]=nan: must be finite and in [0, max_alpha=2.0]"),
        (_r(alphas=(2.5,)), "alphas[0]=2.5: must be finite and in [0, max_alpha=2.0]"),
        (_r(alphas=(-0.1,)), "alphas[0]=-0.1: must be finite and in [0, max_alpha=2.0]"),
        (_r(solver="foo", anchor="large"), "solver='foo': must be one of grid, newton, joint"),
        (_r(max_alpha=float("inf")), "max_alpha=inf: must be finite and in (0, 10.0]"),
        (_r(max_alpha=11.0), "max_alpha=11.0: must be finite and in (0, 10.0]"),
        (_r(small=None), "small=None: required when experts is not empty (each delta is l_expert - l_small)"),
        (_r(small="ea"), "small='ea': must not also be an expert"),
        (_r(experts=("ea", "ea"), alphas=(1.0, 1.0)), "experts[1]='ea': named twice"),
        (_r(experts=("",)), "experts[0]='': must be a non-empty string"),
        (_r(coeffs=()), "coeffs=(): must be a non-empty tuple of (model name, weight) pairs"),
        (_r(coeffs=(("large", float("nan")),)), "coeffs[0]=('large', nan): weight must be finite"),
        (_r(coeffs=(("large", 1.0), ("large", 2.0))), "coeffs[1]=('large', 2.0): model 'large' appears twice"),
        (_r(coeffs=(("large",),)), "coeffs[0]=('large',): must be a (model name, weight) pair"),
        (_r(solver="newton", alphas=()), "anchor=None: required when solver='newton' (the large base whose distribution is P)"),
        (_r(solver="newton", alphas=(), anchor="small"),
         "anchor='small': must be in coeffs with weight 1.0, got coeffs=(('large', 1.0),)"),
        (_r(solver="grid", alphas=(), anchor="large", coeffs=(("large", 1.0), ("x", 0.5))),
         "coeffs=(('large', 1.0), ('x', 0.5)): a DLF recipe fuses exactly anchor + deltas, so coeffs must be "
         "(('large', 1.0),)"),
        (_r(solver="joint", experts=(), alphas=(), anchor="large"), "experts=(): solver='joint' needs at least one expert"),
        (_r(name=""), "name='': must be a non-empty string"),
    ],
)
def test_validate_names_the_field_and_the_limit(recipe, message):
    with pytest.raises(ValueError) as e:
        recipe.validate()
    assert str(e.value) == message


def test_fuse_validates_the_recipe_first():
    with pytest.raises(ValueError, match="alphas"):
        fuse(make_logits(0, 1, 4), _r(alphas=(3.0,)))


def test_model_names_sorted_and_lists_become_tuples():
    r = Recipe(name="custom", coeffs=[["large", 1.0]], experts=["eb", "ea"], small="small", alphas=[1.0, 0.5])
    r.validate()
    assert r.coeffs == (("large", 1.0),) and r.experts == ("eb", "ea") and r.alphas == (1.0, 0.5)
    assert r.model_names() == ("ea", "eb", "large", "small")
    assert hash(r) == hash(Recipe(name="custom", coeffs=(("large", 1.0),), experts=("eb", "ea"), small="small",
                                   alphas=(1.0, 0.5)))
    assert presets.eft_up("large", "small", "ea").model_names() == ("ea", "large", "small")


def test_a_validated_recipe_is_trusted_and_a_changed_copy_is_not(monkeypatch):
    calls = []
    real = recipe_module._check_coeffs
    monkeypatch.setattr(recipe_module, "_check_coeffs", lambda c: (calls.append(c), real(c))[1])
    raw = Recipe(name="custom", coeffs=(("large", 1.0),), experts=("ea",), small="small", alphas=(0.5,))
    assert not raw.validated
    assert raw.validate() is raw and raw.validated and calls == [raw.coeffs]
    raw.validate()
    assert len(calls) == 1  # checked once: a frozen recipe that passed stays valid
    bad = replace(raw, alphas=(3.0,))  # a changed copy is a new, unchecked value
    assert not bad.validated
    with pytest.raises(ValueError, match=r"alphas\[0\]=3.0: must be finite and in \[0, max_alpha=2.0\]"):
        fuse(make_logits(0, 1, 4), bad)
    assert bad == Recipe(name="custom", coeffs=(("large", 1.0),), experts=("ea",), small="small", alphas=(3.0,))
    assert presets.dlf("large", "small", ["ea"]).validated  # every preset comes back trusted
    calls.clear()
    renamed = raw.named("my_preset")
    assert renamed.validated and renamed.name == "my_preset" and calls == []  # a name changes no math
    assert not bad.named("x").validated
    with pytest.raises(ValueError, match="name='': must be a non-empty string"):
        raw.named("")


def test_fuse_checks_an_unvalidated_recipe_once_and_never_a_trusted_one(monkeypatch):
    calls = []
    real = recipe_module._check_coeffs
    monkeypatch.setattr(recipe_module, "_check_coeffs", lambda c: (calls.append(c), real(c))[1])
    solver_checks = []
    monkeypatch.setattr(dlf_module, "check_solver", lambda s: solver_checks.append(s))
    z = make_logits(3, 2, 12)
    trusted = presets.dlf("large", "small", ["ea", "eb"], solver="joint")
    calls.clear()
    for _ in range(5):  # five decode steps
        fuse(z, trusted)
        fuse(z, trusted, support="dense")
    assert calls == [] and solver_checks == []  # neither the recipe nor its solver re-checked per step
    raw = Recipe(name="custom", coeffs=(("large", 1.0),), experts=("ea", "eb"), small="small", solver="grid",
                 anchor="large")
    for _ in range(5):
        fuse(z, raw)
    assert len(calls) == 1 and raw.validated  # the first call validated it; the next four trusted it


def test_solve_problem_trusts_its_solver_but_names_an_unknown_one():
    assert set(dlf_module._SOLVE) == set(SOLVERS)  # the table's solvers are exactly the implemented ones
    lp = torch.log_softmax(torch.randn(3, 2, 9, generator=torch.Generator().manual_seed(0)), -1)
    pb = dlf_module.prepare(lp[0], lp[1], lp[2:], torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="solver='bisect': must be one of " + ", ".join(SOLVERS)):
        dlf_module.solve_problem(pb, "bisect", 2.0)


# ---------------------------------------------------------------------------------------------------------------
# The method table (fusion.methods): every rule about a method is read from its row


MINIMAL = {  # one valid Choice per method
    "single": Choice(model="large"),
    "proxy_tuning": Choice(large="large", small="small", experts=("ea",)),
    "static": Choice(large="large", small="small", experts=("ea", "eb")),
    "eft_up": Choice(large="large", small="small", experts=("ea",)),
    "eft_down": Choice(large="large", small="small", model="large_ft"),
    "lambda_interp": Choice(large="large", small="small", experts=("ea", "eb"), interp_lambda=0.25),
    "dlf": Choice(large="large", small="small", experts=("ea",)),
    "routed": Choice(large="large", small="small", experts=("ea", "eb"), examples=(((1, 2),), ((3,),))),
}


def test_every_row_builds_through_its_constructor_and_reads_what_it_says():
    assert tuple(methods.RULES) == methods.METHODS == tuple(MINIMAL) == tuple(presets.PRESETS)
    for name, rule in methods.RULES.items():
        assert rule.constructor is presets.PRESETS[name] and presets.DESCRIPTIONS[name] == rule.description
        recipe = rule.build(MINIMAL[name])
        assert recipe.method == name and recipe.validated
        choice = MINIMAL[name]
        lo, hi = rule.experts
        assert lo <= len(choice.experts) <= hi
        bases = {getattr(choice, role) for role in rule.reads}
        assert set(recipe.model_names()) == bases | set(choice.experts) | ({choice.model} - {None}), name
        assert bool(recipe.solver) == bool(rule.fusing().solvers)
        assert recipe.solver in (None, *rule.fusing().solvers)


@pytest.mark.parametrize("name", methods.METHODS)
def test_the_topology_reads_each_rule_from_the_table(name):
    from pydantic import ValidationError

    from logitfusion.cluster.topology import RecipeSpec

    rule = methods.RULES[name]
    lo, hi = rule.experts
    with pytest.raises(ValidationError, match=f"method {name!r} takes"):
        RecipeSpec(method=name, experts=tuple(f"e{i}" for i in range(hi + 1)))
    values = {"model": "m", "alphas": (0.5,) * max(lo, 1), "beta": 0.5, "interp_lambda": 0.5, "solver": "grid",
              "inner": "dlf", "tau": 0.1, "top_k": 1, "min_similarity": 0.1}
    for field, value in values.items():
        if rule.takes(field):
            continue
        with pytest.raises(ValidationError) as info:
            RecipeSpec(method=name, experts=tuple(f"e{i}" for i in range(lo)), **{field: value})
        assert f"{field}: {methods.takers(field)}, not {name!r}" in str(info.value)


def test_error_messages_list_the_tables_solvers_and_methods(monkeypatch):
    from pydantic import ValidationError

    from logitfusion.cli import build_parser
    from logitfusion.cluster.topology import RecipeSpec

    with pytest.raises(ValidationError) as info:
        RecipeSpec(method="dlf", experts=("e",), solver="bisect")
    assert all(repr(s) in str(info.value) for s in SOLVERS)
    with pytest.raises(ValueError, match="must be one of " + ", ".join(SOLVERS)):
        presets.dlf("l", "s", ["e"], solver="bisect")
    assert methods.takers("solver") == "only method dlf (or routed with inner dlf) solves weights"
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: a.choices for a in gen._actions}
    assert tuple(choices["solver"]) == SOLVERS and tuple(choices["route_inner"]) == methods.INNER_METHODS
    from logitfusion.v1 import fusion_pb2 as pb  # the request fields of both edges are the table's

    assert {f.name for f in pb.RecipeSelection.DESCRIPTOR.fields} == {"preset", "method", *methods.FIELDS}
    from logitfusion.cluster import http_app

    assert set(http_app._RECIPE_FIELDS) == {"method", *methods.FIELDS}


def test_solver_static_stands_for_the_rows_solving_off():
    assert methods.RULES["routed"].solving_off == ("inner", methods.SOLVING_OFF)
    assert {r.solving_off for n, r in methods.RULES.items() if n != "routed"} == {("method", "static")}


# ---------------------------------------------------------------------------------------------------------------
# Presets


def test_every_preset_is_registered_and_builds():
    args = {
        "single": {"model": "large"},
        "proxy_tuning": {"large": "large", "small": "small", "expert": "ea"},
        "static": {"large": "large", "small": "small", "experts": ["ea", "eb"]},
        "eft_up": {"large": "large", "small": "small", "expert": "ea", "beta": 2.0},
        "eft_down": {"small": "small", "large": "large", "large_ft": "large_ft"},
        "lambda_interp": {"large": "large", "small": "small", "expert_a": "ea", "expert_b": "eb", "lam": 0.5},
        "dlf": {"large": "large", "small": "small", "experts": ["ea"], "solver": "grid"},
        "routed": {"large": "large", "small": "small", "experts": ["ea", "eb"], "examples": [[[1, 2]], [[3]]]},
    }
    assert set(presets.PRESETS) == set(args) == set(presets.DESCRIPTIONS)
    z = make_logits(5, 2, 9)
    for name, kwargs in args.items():
        recipe = presets.build(name, **kwargs)
        assert recipe == presets.PRESETS[name](**kwargs)
        assert recipe.method == name and recipe.name == name
        routed = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) if recipe.route is not None else None  # row 2: "none"
        assert torch.isfinite(fuse(z, recipe, routed).logprobs).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: presets.build("dexperts"), "method='dexperts': must be one of single, proxy_tuning, static, eft_up, "
         "eft_down, lambda_interp, dlf, routed"),
        (lambda: presets.build("single", model="large", alpha=1.0), "alpha: not an argument of preset 'single'"),
        (lambda: presets.build("eft_down", small="s", large="l"), "large_ft: required by preset 'eft_down'"),
        (lambda: presets.eft_up("l", "s", "e", beta=-1.0), "beta=-1.0: must be finite and in [0.0, 10.0]"),
        (lambda: presets.eft_up("l", "s", "e", beta=math.inf), "beta=inf: must be finite and in [0.0, 10.0]"),
        (lambda: presets.lambda_interp("l", "s", "a", "b", 1.5), "lam=1.5: must be finite and in [0.0, 1.0]"),
        (lambda: presets.dlf("l", "s", [], solver="grid"), "experts=[]: must be a model name or a non-empty sequence"),
        (lambda: presets.dlf("l", "s", ["e"], solver="bisect"), "solver='bisect': must be one of grid, newton, joint"),
        (lambda: presets.static("l", "s", ["a", "b"], [1.0]), "alphas=(1.0,): has 1 entries for 2 experts"),
        (lambda: presets.proxy_tuning("l", "s", "e", alpha=2.5), "alphas[0]=2.5: must be finite and in [0, max_alpha=2.0]"),
    ],
)
def test_presets_reject_bad_arguments_precisely(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(message)
