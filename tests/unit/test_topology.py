"""The topology config tree: parsing, constraints, cross-field checks and their messages, placement bundles."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import yaml

from logitfusion.cluster.topology import (
    Limits,
    RecipeSpec,
    Topology,
    load_topology,
    parse_topology,
    resolve_model_path,
)
from logitfusion.errors import ConfigError, InvalidRequest

pytestmark = pytest.mark.timeout(60)

BASE = {
    "models": [
        {"name": "large", "role": "large", "path": "models/large"},
        {"name": "small", "role": "small", "path": "models/small"},
        {"name": "expert_a", "role": "expert", "path": "/abs/expert_a"},
        {"name": "expert_b", "role": "expert", "path": "zoo:expert_b"},
        {"name": "large_ft_a", "role": "large_ft", "path": "models/large_ft_a", "num_cpus": 0.5},
    ],
    "presets": {
        "large_base": {"method": "single", "model": "large"},
        "proxy_a": {"method": "proxy_tuning", "experts": ["expert_a"], "alphas": [1.0]},
        "dlf_multi": {"method": "dlf", "experts": ["expert_a", "expert_b"], "solver": "joint"},
        "down_a": {"method": "eft_down", "model": "large_ft_a"},
    },
    "default_preset": "proxy_a",
    "limits": {"max_concurrent_requests": 4, "max_batch_size": 4},
}


def _with(**patch) -> dict:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in patch.items():
        node = data
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_topology(data, "/cfg")
    return str(info.value)


def test_parses_and_defaults():
    topo = parse_topology(BASE, "/cfg")
    assert [m.name for m in topo.models] == ["large", "small", "expert_a", "expert_b", "large_ft_a"]
    assert topo.limits.max_new_tokens == Limits().max_new_tokens
    assert topo.serve.grpc_port == 9000
    assert topo.role_model("large") == "large" and topo.role_model("small") == "small"
    assert topo.presets["dlf_multi"].experts == ("expert_a", "expert_b")


def test_relative_paths_resolve_against_the_yaml_dir(tmp_path: Path):
    cfg = tmp_path / "conf" / "topo.yaml"
    cfg.parent.mkdir()
    cfg.write_text(yaml.safe_dump(BASE))
    topo = load_topology(cfg)
    assert topo.model_path("large") == (cfg.parent / "models" / "large").resolve()
    assert topo.model_path("expert_a") == Path("/abs/expert_a")
    with pytest.raises(ConfigError, match="zoo"):  # unknown zoo name (or no zoo built): named, never a crash
        resolve_model_path("zoo:no_such_model", Path("/base"))
    assert resolve_model_path("sub/x", Path("/base")) == Path("/base/sub/x")


def test_yaml_round_trip(tmp_path: Path):
    topo = parse_topology(BASE, tmp_path)
    again = parse_topology(yaml.safe_load(topo.to_yaml()), tmp_path)
    assert again == topo


def test_unknown_key_is_refused_with_its_name():
    msg = _error(_with(limits={"max_concurent_requests": 3}))
    assert "topology.limits.max_concurent_requests" in msg


def test_duplicate_model_names():
    data = _with()
    data["models"].append({"name": "small", "role": "expert", "path": "x"})
    assert "names must be unique" in _error(data) and "'small'" in _error(data)


def test_two_large_models_are_refused_naming_both():
    msg = _error(_with(models__1={"name": "large2", "role": "large", "path": "x"}))
    assert "role 'large'" in msg and "large2" in msg


def test_default_preset_must_exist():
    msg = _error(_with(default_preset="nope"))
    assert "default_preset" in msg and "'nope'" in msg and "proxy_a" in msg


def test_preset_with_unknown_expert_names_the_preset_and_field():
    msg = _error(_with(presets__proxy_a={"method": "proxy_tuning", "experts": ["expert_z"]}))
    assert "presets.proxy_a.experts[0]" in msg and "expert_z" in msg and "expert_a" in msg


def test_preset_expert_with_wrong_role():
    msg = _error(_with(presets__proxy_a={"method": "proxy_tuning", "experts": ["small"]}))
    assert "role 'small'" in msg


def test_eft_down_needs_large_ft():
    msg = _error(_with(presets__down_a={"method": "eft_down", "model": "expert_a"}))
    assert "presets.down_a.model" in msg and "large_ft" in msg


def test_method_needing_small_without_small_model():
    data = _with()
    data["models"] = [m for m in data["models"] if m["role"] != "small"]
    data["presets"] = {"p": {"method": "dlf", "experts": ["expert_a"]}}
    data["default_preset"] = "p"
    msg = _error(data)
    assert "presets.p.method" in msg and "'small'" in msg


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"method": "proxy_tuning", "experts": ["expert_a", "expert_b"]}, "exactly 1 experts, got 2"),
        ({"method": "static", "experts": ["expert_a"], "alphas": [1.0, 2.0]}, "one per expert"),
        ({"method": "static", "experts": ["expert_a"], "alphas": [3.0]}, "outside [0, max_alpha=2.0]"),
        ({"method": "static", "experts": ["expert_a"], "alphas": [float("nan")]}, "finite number"),
        ({"method": "static", "experts": ["expert_a"], "alphas": [float("inf")]}, "finite number"),
        ({"method": "dlf", "experts": ["expert_a"], "solver": "magic"}, "solver"),
        ({"method": "proxy_tuning", "experts": ["expert_a"], "solver": "grid"}, "only method dlf"),
        ({"method": "eft_up", "experts": ["expert_a"], "beta": 11}, "less than or equal to 10"),
        ({"method": "lambda_interp", "experts": ["expert_a", "expert_b"]}, "needs interp_lambda"),
        ({"method": "lambda_interp", "experts": ["expert_a", "expert_b"], "interp_lambda": 1.5}, "interp_lambda"),
        ({"method": "single"}, "needs a model name"),
        ({"method": "dlf", "experts": ["expert_a", "expert_a"]}, "appear once"),
        ({"method": "dlf", "experts": ["expert_a"], "max_alpha": 0}, "max_alpha"),
    ],
)
def test_recipe_spec_constraints(spec, needle):
    msg = _error(_with(presets__proxy_a=spec))
    assert "topology.presets.proxy_a" in msg and needle in msg


@pytest.mark.parametrize(
    "limits, needle",
    [
        ({"max_concurrent_requests": 0}, "max_concurrent_requests"),
        ({"max_concurrent_requests": 2, "max_batch_size": 4}, "max_batch_size (4) exceeds max_concurrent_requests (2)"),
        ({"max_new_tokens": 8, "default_max_new_tokens": 16}, "default_max_new_tokens (16) exceeds max_new_tokens (8)"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
    ],
)
def test_limit_checks_quote_values_and_fields(limits, needle):
    msg = _error(_with(limits={"max_concurrent_requests": 4, "max_batch_size": 4, **limits}))
    assert needle in msg


def test_bad_port_and_bad_top_level():
    assert "grpc_port" in _error(_with(serve={"grpc_port": 70000}))
    with pytest.raises(ConfigError, match="mapping"):
        parse_topology(["not", "a", "mapping"])


def test_load_reports_bad_yaml_and_missing_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_topology(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_topology(tmp_path / "missing.yaml")


def test_bundles_cpu_only_and_with_gpus():
    data = _with()
    data["models"][0]["tp_size"] = 2
    data["models"][0]["driver_num_cpus"] = 0.125
    topo = parse_topology(data)
    cpu = topo.placement_bundles(num_gpus_available=0)
    assert cpu[0] == {"CPU": topo.serve.coordinator_num_cpus}
    assert len(cpu) == 1 + 5  # coordinator + one per model; the tp=2 model's bundle holds its driver only
    assert cpu[1] == {"CPU": 0.125}
    assert all("GPU" not in b for b in cpu)
    gpu = topo.placement_bundles(num_gpus_available=8)
    assert [b.get("GPU", 0) for b in gpu] == [0.1, 0, 1, 1, 1, 1]  # 6 shards, 8 GPUs: the coordinator fuses on one
    assert gpu[-1]["CPU"] == 0.5
    assert topo.shard_bundles("large", 8) == [{"CPU": 0.25, "GPU": 1.0}] * 2
    assert topo.shard_bundles("small", 8) == []
    total = topo.bundles(num_gpus_available=8)  # capacity of one pipeline: its group plus the tp shards
    assert sum(b.get("GPU", 0) for b in total) == 6.1
    assert total == gpu + topo.shard_bundles("large", 8)


def test_one_gpu_is_shared_by_the_pipeline_and_many_gpus_are_not():
    topo = parse_topology(_with())  # 5 single-shard models; the first bundle is the coordinator's (fusion)
    assert [b.get("GPU", 0) for b in topo.placement_bundles(1)] == [0.1, 0.18, 0.18, 0.18, 0.18, 0.18]
    assert [b.get("GPU", 0) for b in topo.placement_bundles(3)] == [0.1, 0.58, 0.58, 0.58, 0.58, 0.58]
    assert [b.get("GPU", 0) for b in topo.placement_bundles(5)] == [0, 1, 1, 1, 1, 1]  # no GPU to spare
    assert [b.get("GPU", 0) for b in topo.placement_bundles(6)] == [0.1, 1, 1, 1, 1, 1]  # a spare one
    assert sum(b.get("GPU", 0) for b in topo.bundles(1)) <= 1
    pinned = parse_topology(_with(serve={"coordinator_num_gpus": 0.25, "fusion_device": "cuda"}))
    assert [b.get("GPU", 0) for b in pinned.placement_bundles(1)] == [0.25, 0.15, 0.15, 0.15, 0.15, 0.15]
    assert pinned.serve.fusion_device == "cuda"
    for bad, message in (({"coordinator_num_gpus": 2}, "coordinator_num_gpus"), ({"fusion_device": "tpu"},
                                                                                  "fusion_device")):
        with pytest.raises(ValueError, match=message):
            parse_topology(_with(serve=bad))


def test_explicit_num_gpus_wins():
    data = _with()
    data["models"][1]["num_gpus"] = 0.5
    topo = parse_topology(data)
    assert topo.placement_bundles(0)[2] == {"CPU": 0.25, "GPU": 0.5}


def test_merged_overrides_keep_the_preset_and_recheck():
    spec = RecipeSpec(method="static", experts=("expert_a", "expert_b"), alphas=(1.0, 0.5))
    assert spec.merged({"alphas": (0.2, 0.3)}).alphas == (0.2, 0.3)
    # new experts drop the preset's alphas (they belonged to the old experts)
    assert spec.merged({"experts": ("expert_a",)}).alphas == ()
    # a different method starts from scratch
    assert spec.merged({"method": "single", "model": "large"}).experts == ()
    with pytest.raises(ValueError, match="alphas"):
        spec.merged({"alphas": (math.nan, 1.0)})


def _topo() -> Topology:
    return parse_topology(BASE, "/cfg")


def test_resolve_recipe_rejects_unknown_preset_naming_the_choices():
    with pytest.raises(InvalidRequest) as info:
        _topo().resolve_recipe("nope")
    assert "recipe.preset" in str(info.value) and "dlf_multi" in str(info.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"experts": ("expert_z",)}, "recipe.experts[0]: unknown expert 'expert_z'"),
        ({"alphas": (float("nan"),)}, "recipe.alphas.0: Input should be a finite number"),
        ({"alphas": (5.0,)}, "alphas[0]: 5.0 is outside [0, max_alpha=2.0]"),
        ({"method": "bogus"}, "recipe.method"),
        ({"solver": "grid"}, "only method dlf"),
    ],
)
def test_resolve_recipe_override_errors_name_the_field(overrides, needle):
    with pytest.raises(InvalidRequest) as info:
        _topo().resolve_recipe("proxy_a", overrides)
    assert needle in str(info.value)


def test_yaml_text_with_comments_parses(tmp_path: Path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            # a minimal single-model deployment
            models:
              - {name: only, role: large, path: m}
            presets:
              base: {method: single, model: only}
            default_preset: base
            """
        )
    )
    topo = load_topology(cfg)
    assert topo.default_preset == "base" and topo.limits.max_concurrent_requests == 16


def test_presets_build_fusion_recipes_named_after_the_preset():
    topo = _topo()
    proxy = topo.recipe("proxy_a")
    assert proxy.name == "proxy_a" and proxy.method == "proxy_tuning" and proxy.validated  # trusted from here on
    assert proxy.coeffs == (("large", 1.0),) and proxy.experts == ("expert_a",) and proxy.small == "small"
    assert proxy.alphas == (1.0,) and proxy.solver is None
    multi = topo.recipe("dlf_multi")
    assert multi.solver == "joint" and multi.experts == ("expert_a", "expert_b") and multi.anchor == "large"
    down = topo.recipe("down_a")
    assert down.model_names() == ("large", "large_ft_a", "small")
    assert topo.recipe("large_base").model_names() == ("large",)


def test_overrides_build_a_custom_recipe():
    topo = _topo()
    name, r = topo.resolve_recipe("dlf_multi", {"solver": "grid"})
    assert name == "custom" and r.solver == "grid" and r.experts == ("expert_a", "expert_b") and r.validated
    name, r = topo.resolve_recipe("dlf_multi", {"solver": "static"})  # solving off: fixed alphas, same experts
    assert r.solver is None and r.alphas == (1.0, 1.0) and r.experts == ("expert_a", "expert_b")
    _, r = topo.resolve_recipe("proxy_a", {"method": "eft_up", "experts": ("expert_b",), "beta": 0.5})
    assert r.method == "eft_up" and dict(r.coeffs) == {"expert_b": 1.0, "large": 0.5, "small": -0.5}
    _, r = topo.resolve_recipe(None, {"alphas": (0.25,)})  # the default preset (proxy_a) with another alpha
    assert r.alphas == (0.25,)
    assert topo.resolve_recipe(None, {}) == ("proxy_a", topo.recipe("proxy_a"))


def test_the_committed_zoo_topology_parses_and_builds_every_preset():
    cfg = Path(__file__).resolve().parents[2] / "configs" / "zoo.yaml"
    topo = load_topology(cfg)  # zoo: paths are resolved only when a worker starts
    assert topo.role_model("large") == "large" and topo.role_model("small") == "small"
    experts = [m.name for m in topo.models if m.role == "expert"]
    assert len(experts) >= 3 and topo.default_preset == "routed_multi"  # no task label: routed, then DLF
    for name in topo.presets:
        assert topo.recipe(name).name == name
    assert topo.recipe("dlf_multi").experts == tuple(experts)
    routed = topo.recipe("routed_multi")
    assert routed.experts == tuple(experts) and routed.solver == "newton" and routed.route.model == "small"
    assert [len(e) for e in routed.route.examples] == [8] * len(experts)  # 8 training prompts per expert


def test_the_coordinator_replica_asks_for_its_gpu_share():
    """Serve's replica (which fuses) gets the coordinator's GPU share; its bundle in the placement group matches."""
    from logitfusion.cluster.launch import deployment_options

    topo = parse_topology(_with())
    for gpus in (0, 1, 5, 6):
        opts = deployment_options(topo, gpus)
        assert opts["ray_actor_options"]["num_gpus"] == topo.coordinator_gpus(gpus)
        assert opts["placement_group_bundles"][0].get("GPU", 0) == topo.coordinator_gpus(gpus)
    assert deployment_options(topo, 0)["ray_actor_options"]["num_gpus"] == 0
