"""Routed fusion's math (fusion/routing.py), its preset and its topology form, without models."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from logitfusion.cluster.topology import load_topology, parse_topology
from logitfusion.errors import ConfigError, InvalidRequest
from logitfusion.fusion import fuse, presets
from logitfusion.fusion.routing import Routing, build_table, route, route_weights, similarities

pytestmark = pytest.mark.timeout(60)

EX = [[[1, 2, 3], [1, 2, 4]], [[5, 6]], [[7], [8, 9]]]  # example prompts (token ids) of three experts


def _logits(seed: int, B: int = 3, V: int = 23) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: 3 * torch.randn(B, V, generator=g) for n in ("L", "S", "a", "b", "c")}


def _table(seed: int = 0, T: int = 3, K: int = 4, H: int = 16):
    """T clusters of K example vectors around a shared offset (uncentred cosines all near 1, as in a real model)."""
    g = torch.Generator().manual_seed(seed)
    shared = 20 * torch.randn(H, generator=g)
    centres = torch.randn(T, H, generator=g)
    feats = [shared + centres[t] + 0.05 * torch.randn(K, H, generator=g) for t in range(T)]
    return feats, shared, centres


def test_permuting_the_experts_permutes_the_weights() -> None:
    feats, shared, centres = _table()
    g = torch.Generator().manual_seed(1)
    query = shared + centres[[2, 0, 1, 1]] + 0.05 * torch.randn(4, 16, generator=g)  # [4, H]
    r = Routing("S", tuple((((1,),),) * 3), tau=0.5, top_k=0, min_similarity=-1.0)
    w, sims = route(query, build_table(feats, centre=True), r)
    perm = [2, 0, 1]
    w_p, sims_p = route(query, build_table([feats[i] for i in perm], centre=True), r)
    torch.testing.assert_close(w_p, w[:, perm])
    torch.testing.assert_close(sims_p, sims[:, perm])
    assert w.argmax(1).tolist() == [2, 0, 1, 1]


def test_centring_separates_what_plain_cosine_cannot() -> None:
    feats, shared, centres = _table()
    query = (shared + centres[1]).unsqueeze(0)
    plain = similarities(query, build_table(feats, centre=False))[0]
    centred = similarities(query, build_table(feats, centre=True))[0]
    assert plain.min() > 0.99  # every expert looks alike without the centre
    assert centred[1] > 0.9 and centred[[0, 2]].max() < 0.5


def test_a_prompt_far_from_every_expert_is_routed_to_none_and_fuses_to_the_large_base() -> None:
    feats, shared, _ = _table()
    g = torch.Generator().manual_seed(2)
    far = (shared + 3 * torch.randn(16, generator=g)).unsqueeze(0)  # no expert's direction
    r = Routing("S", tuple((((1,),),) * 3), min_similarity=0.5)
    w, sims = route(far, build_table(feats, centre=True), r)
    assert sims.max() < 0.5 and w.abs().sum() == 0
    recipe = presets.routed("L", "S", ["a", "b", "c"], EX)
    lg = _logits(0, B=1)
    res = fuse(lg, recipe, w)
    torch.testing.assert_close(res.logprobs, torch.log_softmax(lg["L"], -1))
    assert res.alphas.abs().sum() == 0


def test_top_k_and_temperature() -> None:
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.1]], dtype=torch.float64)
    w1 = route_weights(sims, tau=0.05, top_k=1, min_similarity=0.5)
    assert w1.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # row 2: best 0.3 < 0.5 -> none
    w2 = route_weights(sims, tau=0.1, top_k=2, min_similarity=0.0)
    torch.testing.assert_close(w2[0, :2], torch.softmax(torch.tensor([9.0, 8.0]), 0))
    assert w2[0, 2] == 0 and torch.allclose(w2.sum(1), torch.ones(2))
    w_all = route_weights(sims, tau=1e-3, top_k=0, min_similarity=-1.0)  # tiny tau: the argmax
    assert w_all.argmax(1).tolist() == [0, 1] and torch.allclose(w_all.max(1).values, torch.ones(2))


def test_routed_top1_dlf_is_single_expert_dlf_and_static_scales_the_alphas() -> None:
    lg = _logits(3)
    w = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0.5, 0.5]])
    res = fuse(lg, presets.routed("L", "S", ["a", "b", "c"], EX, solver="newton"), w)
    for row, e in ((0, "a"), (1, "c")):
        one = fuse({k: v[row : row + 1] for k, v in lg.items()}, presets.dlf("L", "S", [e], solver="newton"))
        torch.testing.assert_close(res.logprobs[row], one.logprobs[0])
        assert res.alphas[row].nonzero().flatten().tolist() == [["a", "b", "c"].index(e)]
    # a soft mix: one alpha for the mixture delta, reported per expert as alpha * w
    assert res.alphas[2, 1] == pytest.approx(res.alphas[2, 2]) and res.alphas[2, 0] == 0
    st = fuse(lg, presets.routed("L", "S", ["a", "b", "c"], EX, inner="static", alphas=[1.0, 2.0, 0.5]), w)
    torch.testing.assert_close(st.alphas, w * torch.tensor([1.0, 2.0, 0.5]))
    ref = fuse(lg, presets.static("L", "S", ["a", "b", "c"], [0.0, 1.0, 0.25]))
    torch.testing.assert_close(st.logprobs[2], ref.logprobs[2])


@pytest.mark.parametrize(
    "weights, needle",
    [
        (None, "route_weights: a routed recipe needs one weight per row and expert, shape [3, 3]"),
        (torch.ones(3, 2), "shape [3, 3]"),
        (torch.full((3, 3), 0.5), "each row must sum to 1"),
        (torch.tensor([[1.0, 0, 0]] * 2 + [[float("nan"), 0, 0]]), "finite and in [0, 1]"),
    ],
)
def test_bad_route_weights_name_the_field(weights, needle) -> None:
    with pytest.raises(ValueError, match=None) as info:
        fuse(_logits(0), presets.routed("L", "S", ["a", "b", "c"], EX), weights)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"tau": 0.0}, "route.tau=0.0"),
        ({"top_k": 4}, "route.top_k=4: must be an integer in 0..3"),
        ({"min_similarity": 2.0}, "route.min_similarity=2.0"),
        ({"examples": EX[:2]}, "route.examples: needs one tuple of example prompts per expert (3)"),
        ({"examples": [[[1]], [[]], [[2]]]}, "route.examples[1][0]: must be a non-empty tuple of token ids"),
        ({"examples": [[[1]], [], [[2]]]}, "route.examples[1] (b): must hold 1..64 example prompts"),
        ({"inner": "joint"}, "inner='joint'"),
    ],
)
def test_bad_routing_is_refused_naming_the_field(kwargs, needle) -> None:
    args = {"examples": EX, **kwargs}
    with pytest.raises(ValueError) as info:
        presets.routed("L", "S", ["a", "b", "c"], **args)
    assert needle in str(info.value)


def test_one_expert_cannot_be_centred_and_a_routing_survives_pickling() -> None:
    with pytest.raises(ValueError, match="route.centre=True: needs at least 2 experts"):
        presets.routed("L", "S", ["a"], EX[:1])
    r = presets.routed("L", "S", ["a"], EX[:1], centre=False)
    again = pickle.loads(pickle.dumps(r))
    assert again == r and hash(again) == hash(r)  # a Ray job's recipes group with locally built ones


# ------------------------------------------------------------------------------------------------ topology


ZOO_YAML = Path(__file__).resolve().parents[2] / "configs" / "zoo.yaml"


def test_zoo_topology_routed_overrides_and_their_errors() -> None:
    topo = load_topology(ZOO_YAML)
    name, r = topo.resolve_recipe(None, {"tau": 0.2, "top_k": 0, "min_similarity": 0.3})
    assert name == "custom" and (r.route.tau, r.route.top_k, r.route.min_similarity) == (0.2, 0, 0.3)
    assert r.route.examples == topo.recipe("routed_multi").route.examples
    _, r = topo.resolve_recipe(None, {"solver": "static"})  # routed: static alphas over the routed experts
    assert r.method == "routed" and r.solver is None and r.alphas == (1.0,) * 4
    _, r = topo.resolve_recipe("routed_multi_static", {"inner": "dlf"})
    assert r.solver == "newton" and r.alphas == ()
    for overrides, needle in [
        ({"top_k": 5}, "top_k: 5 exceeds the 4 experts"),
        ({"tau": -1.0}, "recipe.tau"),
        ({"inner": "joint"}, "recipe.inner"),
        ({"inner": "static", "solver": "grid"}, "solver: only method dlf (or routed with inner dlf)"),
    ]:
        with pytest.raises(InvalidRequest) as info:
            topo.resolve_recipe(None, overrides)
        assert needle in str(info.value), (overrides, str(info.value))
    with pytest.raises(InvalidRequest, match="tau: only method routed takes it"):
        topo.resolve_recipe("dlf_multi", {"tau": 0.1})


def _mini(**expert_a) -> dict:
    return {
        "models": [
            {"name": "large", "role": "large", "path": "/m/l"},
            {"name": "small", "role": "small", "path": "/m/s"},
            {"name": "expert_a", "role": "expert", "path": "/m/a", **expert_a},
            {"name": "expert_b", "role": "expert", "path": "/m/b", "route_examples": ["what is b?"]},
        ],
        "presets": {"r": {"method": "routed", "experts": ["expert_a", "expert_b"]}},
        "default_preset": "r",
    }


def test_topology_refuses_routing_to_an_expert_without_examples_and_bad_examples() -> None:
    with pytest.raises(ConfigError, match=r"presets.r.experts\[0\]: 'expert_a' has no route_examples"):
        parse_topology(_mini())
    with pytest.raises(ConfigError, match="names no zoo task"):
        parse_topology(_mini(route_examples=["zoo:nope"]))
    with pytest.raises(ConfigError, match=r"route_examples\[0\]: must be non-empty"):
        parse_topology(_mini(route_examples=["  "]))
    data = _mini(route_examples=["what is a?"])
    data["models"][0]["route_examples"] = ["x"]
    with pytest.raises(ConfigError, match="only experts are routed to"):
        parse_topology(data)


@pytest.mark.parametrize("inner", ["dlf", "static"])
@pytest.mark.parametrize("support", ["auto", "candidates"])
def test_the_fast_path_matches_the_dense_reference(inner, support) -> None:
    lg = {k: v.double() for k, v in _logits(5, B=4, V=300).items()}  # fp64: compare the paths, not the rounding
    w = torch.tensor([[1.0, 0, 0], [0, 0.3, 0.7], [0, 0, 0], [0.2, 0.5, 0.3]])  # top-1, a mix, none, all three
    recipe = presets.routed("L", "S", ["a", "b", "c"], EX, inner=inner, alphas=None if inner == "dlf" else [1, 2, 0.5])
    fast = fuse(lg, recipe, w, support=support)
    dense = fuse(lg, recipe, w, support="dense")
    torch.testing.assert_close(fast.logprobs.exp(), dense.logprobs.exp(), atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(fast.alphas, dense.alphas, atol=1e-6, rtol=0)
    torch.testing.assert_close(fast.logprobs[2], torch.log_softmax(lg["L"][2], -1), atol=1e-9, rtol=0)  # none
