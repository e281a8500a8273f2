"""The KubeRay manifests and the image recipe in k8s/, checked offline (no cluster, no docker).

The checks live in k8s/check_k8s.py (operators run it before `kubectl apply`); these tests run every check on the
real files, and run each one on a deliberately broken copy to show it can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
EXPECTED_MANIFESTS = {
    "rayservice.yaml": {"RayService"},
    "rayservice-gcs-ft.yaml": {"RayService", "Secret", "PersistentVolumeClaim", "Deployment", "Service"},
    "rayjob-eval.yaml": {"RayJob"},
    "raycluster.yaml": {"RayCluster"},
    "volumes.yaml": {"PersistentVolumeClaim"},
    "networkpolicy.yaml": {"NetworkPolicy"},
}

pytestmark = pytest.mark.timeout(120)


def _load_checker() -> Any:
    spec = importlib.util.spec_from_file_location("check_k8s", K8S / "check_k8s.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_k8s"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


ck = _load_checker()


@pytest.fixture(scope="module")
def schemas() -> Path:
    path = ck.schema_dir(REPO)
    if path is None:
        pytest.skip(
            f"KubeRay CRD schemas not found: set {ck.SCHEMAS_ENV} or provide {REPO.parent / 'shared' / 'k8s-schemas'}"
        )
    return path


def docs_of(name: str) -> list[dict]:
    return ck.load_manifest(K8S / name)


def the(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def group(cluster: dict, name: str) -> dict:
    (g,) = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == name]
    return g


def container(template: dict) -> dict:
    return template["spec"]["containers"][0]


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def with_serve_config(doc: dict, config: dict) -> dict:
    out = copy.deepcopy(doc)
    out["spec"]["serveConfigV2"] = yaml.safe_dump(config, sort_keys=False)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Schemas


def test_the_expected_manifests_exist_with_their_kinds():
    names = {p.name for p in ck.manifest_paths(K8S)}
    assert set(EXPECTED_MANIFESTS) <= names
    for name, kinds in EXPECTED_MANIFESTS.items():
        assert {d["kind"] for d in docs_of(name)} == kinds, name


@pytest.mark.parametrize("name", sorted(p.name for p in ck.manifest_paths(K8S)))
def test_every_document_validates_against_its_schema(name, schemas):
    for doc in docs_of(name):
        assert ck.document_errors(doc, schemas) == [], ck.describe(doc)


def test_crd_schema_rejects_a_misspelled_top_level_key(schemas):
    doc = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    cluster = doc["spec"]["rayClusterConfig"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    errors = ck.crd_errors(doc, schemas)
    assert any("workerGroupSpec" in e and "was unexpected" in e for e in errors), errors


def test_crd_schema_rejects_a_misspelled_key_deep_in_a_pod_template(schemas):
    doc = copy.deepcopy(the(docs_of("rayjob-eval.yaml"), "RayJob"))
    worker = container(group(doc["spec"]["rayClusterSpec"], "small-gpu")["template"])
    worker["resource"] = worker.pop("resources")
    errors = ck.crd_errors(doc, schemas)
    assert any("containers[0]" in e and "'resource' was unexpected" in e for e in errors), errors


def test_crd_schema_rejects_a_wrong_type(schemas):
    doc = copy.deepcopy(the(docs_of("raycluster.yaml"), "RayCluster"))
    group(doc["spec"], "small-gpu")["maxReplicas"] = "four"
    assert any("maxReplicas" in e for e in ck.crd_errors(doc, schemas))


def test_core_schema_rejects_a_wrong_type_and_an_unknown_field():
    docs = docs_of("rayservice-gcs-ft.yaml")
    deployment = copy.deepcopy(the(docs, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    assert any("replicas" in e for e in ck.core_errors(deployment))
    service = copy.deepcopy(the(docs, "Service"))
    service["spec"]["portz"] = service["spec"].pop("ports")
    assert any("portz" in e for e in ck.core_errors(service))


def test_embedded_pod_templates_are_checked_against_the_upstream_schema():
    doc = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    assert ck.pod_template_errors(doc) == []
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    head["spec"]["terminationGracePeriodSecond"] = 60
    errors = ck.pod_template_errors(doc)
    assert any("headGroupSpec" in e and "terminationGracePeriodSecond" in e for e in errors), errors


def test_an_unchecked_kind_is_reported(schemas):
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "x"}}
    assert ck.document_errors(doc, schemas) != []


def test_schema_dir_honours_the_environment_variable(tmp_path):
    assert ck.schema_dir(tmp_path / "repo", {ck.SCHEMAS_ENV: str(tmp_path)}) == tmp_path
    assert ck.schema_dir(tmp_path / "repo", {}) is None


# ---------------------------------------------------------------------------------------------------------------
# serveConfigV2


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice-gcs-ft.yaml"])
def test_serve_config_validates_and_has_no_unknown_key(name):
    doc = the(docs_of(name), "RayService")
    assert ck.serve_config_errors(doc["spec"]["serveConfigV2"]) == []


def test_serve_config_exposes_both_grpc_services_on_port_9000():
    config = serve_config(the(docs_of("rayservice.yaml"), "RayService"))
    assert config["grpc_options"]["port"] == 9000
    from logitfusion.cluster.serve_app import SERVICER_FUNCTIONS

    # the same servicer functions `logitfusion serve` registers (garbage bytes -> INVALID_ARGUMENT, not UNKNOWN)
    assert config["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    (app,) = config["applications"]
    assert app["import_path"] == "logitfusion.cluster.serve_app:build_app"
    assert app["args"] == {"config": "/app/configs/serve.yaml"}


def test_servedeployschema_alone_misses_num_replica_and_the_key_check_catches_it():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(the(docs_of("rayservice.yaml"), "RayService"))
    config["applications"][0]["deployments"] = [{"name": "Ingress", "num_replica": 4}]
    ServeDeploySchema.model_validate(config)  # accepted: pydantic drops the unknown key silently
    errors = ck.unknown_keys(config, ServeDeploySchema)
    assert errors == [
        "applications[0].deployments[0].num_replica: unknown key for DeploymentSchema (did you mean 'num_replicas'?)"
    ]
    assert ck.serve_config_errors(yaml.safe_dump(config)) == ["serveConfigV2: " + errors[0]]


@pytest.mark.parametrize(
    ("path", "bad_key"),
    [
        ((), "grpc_option"),
        (("grpc_options",), "servicer_functions"),
        (("applications", 0), "import_paht"),
        (("http_options",), "hots"),
    ],
)
def test_unknown_key_check_catches_typos_at_every_level(path, bad_key):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config(the(docs_of("rayservice.yaml"), "RayService"))
    node: Any = config
    for step in path:
        node = node[step]
    node[bad_key] = 1
    errors = ck.unknown_keys(config, ServeDeploySchema)
    assert len(errors) == 1 and bad_key in errors[0], errors


def test_unknown_key_check_follows_nested_models_lists_and_unions():
    from ray.serve.schema import ServeDeploySchema

    deployment = {
        "name": "Ingress",
        "num_replicas": 1,
        "ray_actor_options": {"num_gpu": 1},  # nested model
        "autoscaling_config": {"min_replica": 1},  # Union[Dict, AutoscalingConfig, None]: checked as the model
    }
    config = {"applications": [{"name": "a", "import_path": "m:f", "deployments": [deployment]}]}
    errors = ck.unknown_keys(config, ServeDeploySchema)
    assert len(errors) == 2, errors
    assert any("ray_actor_options.num_gpu" in e and "'num_gpus'" in e for e in errors)
    assert any("autoscaling_config.min_replica" in e for e in errors)


def test_unknown_key_check_leaves_free_form_mappings_alone():
    from ray.serve.schema import ServeDeploySchema

    app = {
        "name": "a",
        "import_path": "m:f",
        "args": {"config": "/x.yaml", "anything": {"goes": 1}},
        "runtime_env": {"env_vars": {"A": "1"}},
        "deployments": [{"name": "D", "user_config": {"free": True}, "ray_actor_options": {"resources": {"x": 1}}}],
    }
    assert ck.unknown_keys({"applications": [app]}, ServeDeploySchema) == []


def test_unknown_key_check_respects_models_that_allow_extra_keys():
    import pydantic

    class Inner(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="allow")
        size: int = 1

    class Outer(pydantic.BaseModel):
        inner: Inner = Inner()
        items: list[Inner] = []

    assert ck.unknown_keys({"inner": {"size": 2, "anything": 3}}, Outer) == []
    errors = ck.unknown_keys({"inner": {}, "itemz": []}, Outer)
    assert errors == ["itemz: unknown key for Outer (did you mean 'items'?)"]


def test_serve_config_schema_errors_are_reported():
    assert ck.serve_config_errors("grpc_options:\n  port: not-a-port\n") != []
    assert ck.serve_config_errors("- just\n- a list\n") != []


# ---------------------------------------------------------------------------------------------------------------
# Imports (these fail until logitfusion.cluster.serve_app / evaluate exist: the manifests name them)


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice-gcs-ft.yaml"])
def test_every_import_path_and_servicer_function_imports_from_the_project(name):
    config = serve_config(the(docs_of(name), "RayService"))
    targets = ck.serve_import_targets(config)
    assert {what for what, _ in targets} == {"import_path", "grpc_servicer_function"}
    for what, target in targets:
        assert callable(ck.import_object(target)), (what, target)


def test_the_evaluation_entrypoint_module_imports():
    job = the(docs_of("rayjob-eval.yaml"), "RayJob")
    assert job["spec"]["entrypoint"] == "python -m logitfusion.cluster.evaluate --config /app/configs/eval.yaml"
    assert ck.entrypoint_errors(job) == []


def test_import_check_reports_what_does_not_import():
    assert ck.import_error("grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server", "x") == []
    assert ck.import_error("logitfusion.cluster.no_such_module:build_app", "import_path") != []
    assert ck.import_error("grpc_health.v1.health_pb2_grpc.no_such_function", "servicer") != []
    assert ck.import_error("grpc_health.v1:health_pb2_grpc", "servicer") != []  # a module, not callable
    bad = copy.deepcopy(the(docs_of("rayjob-eval.yaml"), "RayJob"))
    bad["spec"]["entrypoint"] = "python -m logitfusion.cluster.no_such_module --config /app/configs/eval.yaml"
    assert ck.entrypoint_errors(bad) != []
    bad["spec"]["entrypoint"] = "bash run-eval.sh"
    assert ck.entrypoint_errors(bad) != []


# ---------------------------------------------------------------------------------------------------------------
# Topologies and the GPU layout


def test_the_serving_topology_loads_with_the_projects_loader():
    topology, errors = ck.load_topology_file(K8S / "configs" / "serve.yaml")
    assert errors == [] and topology is not None
    assert {m.role for m in topology.models} >= {"large", "small", "expert"}
    assert any(m.tp_size > 1 for m in topology.models)  # the large model is tensor parallel


def test_the_evaluation_config_loads_with_the_evaluations_loader():
    config, errors = ck.load_eval_config(K8S / "configs" / "eval.yaml")
    assert errors == [] and config is not None
    assert config.output_dir.startswith("/results/")


@pytest.mark.parametrize("name", sorted(p.name for p in ck.manifest_paths(K8S)))
def test_semantic_checks_pass(name):
    assert ck.semantic_errors(docs_of(name), K8S, check_imports=False) == []


def test_gpu_layout_one_gpu_per_small_model_and_tp_size_gpus_for_the_large_one():
    cluster = the(docs_of("rayservice.yaml"), "RayService")["spec"]["rayClusterConfig"]
    topology, _ = ck.load_topology_file(K8S / "configs" / "serve.yaml")
    (large,) = [m for m in topology.models if m.role == "large"]
    small_pods = group(cluster, "small-gpu")
    large_pods = group(cluster, "large-tp2")
    assert ck.group_gpus(small_pods) == 1
    assert ck.group_gpus(large_pods) == large.tp_size == 2
    for g in (small_pods, large_pods):
        resources = container(g["template"])["resources"]
        assert resources["requests"][ck.GPU] == resources["limits"][ck.GPU]


def _cluster_errors(doc: dict) -> list[str]:
    return ck.semantic_errors([doc], K8S, check_imports=False)


def test_layout_check_catches_a_large_group_without_tp_size_gpus():
    doc = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    resources = container(group(doc["spec"]["rayClusterConfig"], "large-tp2")["template"])["resources"]
    resources["requests"][ck.GPU] = resources["limits"][ck.GPU] = "1"
    errors = _cluster_errors(doc)
    assert any("needs pods with 2 GPU(s)" in e for e in errors), errors


def test_layout_check_catches_too_few_small_pods():
    doc = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    small = group(doc["spec"]["rayClusterConfig"], "small-gpu")
    small["replicas"] = small["minReplicas"] = small["maxReplicas"] = 1
    errors = _cluster_errors(doc)
    assert any("provide 1 pod(s) with 1 GPU(s)" in e and "need 2" in e for e in errors), errors


def test_eval_layout_check_catches_too_few_workers_for_the_pipelines():
    doc = copy.deepcopy(the(docs_of("rayjob-eval.yaml"), "RayJob"))
    small = group(doc["spec"]["rayClusterSpec"], "small-gpu")
    small["replicas"] = small["minReplicas"] = small["maxReplicas"] = 1
    errors = _cluster_errors(doc)
    assert any("hold 2 pipeline actor(s)" in e and "pipelines=4" in e for e in errors), errors


def _job_with_eval_config(tmp_path: Path, edit) -> list[str]:
    k8s = tmp_path / "k8s"
    (k8s / "configs").mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((K8S / "configs" / "eval.yaml").read_text())
    edit(config)
    (k8s / "configs" / "eval.yaml").write_text(yaml.safe_dump(config))
    return ck.semantic_errors(docs_of("rayjob-eval.yaml"), k8s, check_imports=False)


def test_eval_output_must_be_on_the_shared_results_volume(tmp_path):
    errors = _job_with_eval_config(tmp_path, lambda c: c.update(output_dir="results/eval-job"))
    assert any("must be an absolute path" in e for e in errors), errors
    errors = _job_with_eval_config(tmp_path, lambda c: c.update(output_dir="/tmp/eval-job"))
    assert any("headGroupSpec" in e and "not on a writable PersistentVolumeClaim" in e for e in errors), errors
    assert any("small-gpu" in e and "not on a writable PersistentVolumeClaim" in e for e in errors), errors


def test_eval_output_check_needs_the_volume_on_every_worker():
    doc = copy.deepcopy(the(docs_of("rayjob-eval.yaml"), "RayJob"))
    worker = container(group(doc["spec"]["rayClusterSpec"], "small-gpu")["template"])
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["name"] != "results"]
    errors = _cluster_errors(doc)
    assert errors == [
        "RayJob/logitfusion-eval (k8s/configs/eval.yaml) workerGroupSpecs[small-gpu]: output_dir /results/eval-job is "
        "not on a writable PersistentVolumeClaim mount"
    ]


def test_the_dev_cluster_can_also_run_the_evaluation():
    doc = copy.deepcopy(the(docs_of("raycluster.yaml"), "RayCluster"))
    assert _cluster_errors(doc) == []
    worker = container(group(doc["spec"], "large-tp2")["template"])
    worker["volumeMounts"] = [m for m in worker["volumeMounts"] if m["name"] != "results"]
    assert any("large-tp2" in e and "/results/eval-job" in e for e in _cluster_errors(doc))


def test_an_eval_config_the_evaluation_refuses_is_reported(tmp_path):
    errors = _job_with_eval_config(tmp_path, lambda c: c.update(methods=["large_base", "no_such_method"]))
    assert any("no_such_method" in e for e in errors), errors
    errors = _job_with_eval_config(tmp_path, lambda c: c.update(pipelinez=2))
    assert any("pipelinez" in e for e in errors), errors


def test_layout_check_scales_with_serve_replicas(tmp_path):
    k8s = tmp_path / "k8s"
    (k8s / "configs").mkdir(parents=True)
    (k8s / "configs" / "eval.yaml").write_text((K8S / "configs" / "eval.yaml").read_text())
    serve = yaml.safe_load((K8S / "configs" / "serve.yaml").read_text())
    serve["serve"]["replicas"] = 2
    (k8s / "configs" / "serve.yaml").write_text(yaml.safe_dump(serve))
    doc = the(docs_of("rayservice.yaml"), "RayService")
    errors = ck.semantic_errors([doc], k8s, check_imports=False)
    assert any("serve.replicas=2" in e and "need 4" in e for e in errors), errors
    assert any("serve.replicas=2" in e and "need 2" in e for e in errors), errors
    # The autoscaling RayCluster can grow to two pipelines: maxReplicas counts there.
    assert ck.semantic_errors(docs_of("raycluster.yaml"), k8s, check_imports=False) == []


def test_layout_check_counts_the_placement_group_bundles_of_the_app(tmp_path):
    k8s = tmp_path / "k8s"
    (k8s / "configs").mkdir(parents=True)
    serve = yaml.safe_load((K8S / "configs" / "serve.yaml").read_text())
    serve["serve"]["coordinator_num_cpus"] = 30  # bundles: 30 + 4 shards x 2 (+ ...) > 2 x 8 + 16 in the groups
    (k8s / "configs" / "serve.yaml").write_text(yaml.safe_dump(serve))
    errors = ck.semantic_errors([the(docs_of("rayservice.yaml"), "RayService")], k8s, check_imports=False)
    assert any("the worker groups offer 32 CPU" in e for e in errors), errors


def test_the_serve_app_builds_from_the_args_the_rayservice_passes():
    from ray.serve import Application

    config = serve_config(the(docs_of("rayservice.yaml"), "RayService"))
    (app,) = config["applications"]
    image_path = app["args"]["config"]
    args = {**app["args"], "config": str(ck.topology_path(image_path, K8S))}  # the image's file, from the repo
    assert isinstance(ck.import_object(app["import_path"])(args), Application)


def test_a_topology_the_loader_refuses_is_reported(tmp_path):
    k8s = tmp_path / "k8s"
    (k8s / "configs").mkdir(parents=True)
    serve = yaml.safe_load((K8S / "configs" / "serve.yaml").read_text())
    serve["models"][0]["tp_sise"] = 2
    (k8s / "configs" / "serve.yaml").write_text(yaml.safe_dump(serve))
    errors = ck.semantic_errors([the(docs_of("rayservice.yaml"), "RayService")], k8s, check_imports=False)
    assert any("tp_sise" in e for e in errors), errors


def test_a_topology_missing_from_the_image_is_reported():
    doc = copy.deepcopy(the(docs_of("rayjob-eval.yaml"), "RayJob"))
    doc["spec"]["entrypoint"] = "python -m logitfusion.cluster.evaluate --config /app/configs/missing.yaml"
    assert any("missing.yaml" in e for e in _cluster_errors(doc))


def test_grpc_port_and_app_name_must_agree_everywhere():
    doc = the(docs_of("rayservice.yaml"), "RayService")
    assert ck.head_ports(doc["spec"]["rayClusterConfig"])[ck.GRPC_PORT_NAME] == 9000
    moved = copy.deepcopy(doc)
    for port in container(moved["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])["ports"]:
        if port["name"] == "serve-grpc":
            port["containerPort"] = 9001
    assert any("'serve-grpc' is 9001" in e for e in _cluster_errors(moved))
    config = serve_config(doc)
    config["grpc_options"]["port"] = 9001
    errors = _cluster_errors(with_serve_config(doc, config))
    assert any("serve.grpc_port 9000 != grpc_options.port 9001" in e for e in errors), errors
    config = serve_config(doc)
    config["applications"][0]["name"] = "fusion"
    assert any("serve.app_name" in e for e in _cluster_errors(with_serve_config(doc, config)))


def test_upgrade_strategy_must_be_new_cluster():
    doc = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    assert doc["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    doc["spec"]["upgradeStrategy"]["type"] = "NewClusterWithIncrementalUpgrade"
    assert any("upgradeStrategy" in e for e in _cluster_errors(doc))


def test_hygiene_checks_catch_unequal_requests_missing_probes_and_bad_termination():
    base = the(docs_of("rayservice.yaml"), "RayService")

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(base)
        edit(doc["spec"]["rayClusterConfig"])
        return ck.pod_hygiene_errors(doc)

    assert ck.pod_hygiene_errors(base) == []

    def unequal(c):
        container(group(c, "small-gpu")["template"])["resources"]["requests"][ck.GPU] = "0"

    assert any("requests.nvidia.com/gpu=0 != limits" in e for e in broken(unequal))

    def no_probe(c):
        del container(group(c, "large-tp2")["template"])["livenessProbe"]

    assert any("no livenessProbe" in e for e in broken(no_probe))

    def no_prestop(c):
        del container(c["headGroupSpec"]["template"])["lifecycle"]

    assert any("ray stop" in e for e in broken(no_prestop))

    def short_grace(c):
        group(c, "small-gpu")["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    assert any("must exceed the preStop grace 60s" in e for e in broken(short_grace))

    def gpu_head(c):
        resources = container(c["headGroupSpec"]["template"])["resources"]
        resources["requests"][ck.GPU] = resources["limits"][ck.GPU] = "1"

    assert any("head must not take GPUs" in e for e in broken(gpu_head))

    def no_memory_limit(c):
        del container(group(c, "small-gpu")["template"])["resources"]["limits"]["memory"]

    assert any("requests and limits for memory" in e for e in broken(no_memory_limit))


def test_prestop_grace_parsing():
    def with_command(cmd: list[str]) -> dict:
        return {"lifecycle": {"preStop": {"exec": {"command": cmd}}}}

    assert ck.prestop_grace_s(with_command(["/bin/sh", "-c", "ray stop --grace-period 45"])) == 45
    assert ck.prestop_grace_s(with_command(["ray", "stop"])) == 0
    assert ck.prestop_grace_s(with_command(["sleep", "5"])) is None
    assert ck.prestop_grace_s({}) is None


def test_quantities():
    assert ck.quantity("500m") == 0.5
    assert ck.quantity("16Gi") == 16 * 2**30
    assert ck.quantity(2) == 2.0
    with pytest.raises(ValueError, match="not a quantity"):
        ck.quantity("16 Gigs")


# ---------------------------------------------------------------------------------------------------------------
# GCS fault tolerance


def test_gcs_ft_reads_the_redis_password_from_the_secret_it_ships():
    docs = docs_of("rayservice-gcs-ft.yaml")
    assert ck.gcs_ft_errors(docs) == []
    options = the(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert options["redisPassword"] == {"valueFrom": {"secretKeyRef": {"name": "logitfusion-redis", "key": "password"}}}
    assert "externalStorageNamespace" not in options  # KubeRay must give each upgrade cluster its own namespace


def _ft_errors(edit) -> list[str]:
    docs = copy.deepcopy(docs_of("rayservice-gcs-ft.yaml"))
    edit(docs)
    return ck.gcs_ft_errors(docs)


def _ft_options(docs: list[dict]) -> dict:
    return the(docs, "RayService")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]


def test_gcs_ft_check_refuses_an_inline_password():
    errors = _ft_errors(lambda docs: _ft_options(docs).update(redisPassword={"value": "hunter2"}))
    assert any("redisPassword.value" in e for e in errors), errors


def test_gcs_ft_check_refuses_a_secret_or_key_not_in_the_file():
    def other_secret(docs):
        _ft_options(docs)["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] = "elsewhere"

    assert any("Secret 'elsewhere' is not in this file" in e for e in _ft_errors(other_secret))

    def other_key(docs):
        _ft_options(docs)["redisPassword"]["valueFrom"]["secretKeyRef"]["key"] = "pass"

    assert any("has no key 'pass'" in e for e in _ft_errors(other_key))


def test_gcs_ft_check_refuses_a_redis_address_without_service_or_port():
    assert any("names no Service" in e for e in _ft_errors(lambda d: _ft_options(d).update(redisAddress="redis:6379")))
    errors = _ft_errors(lambda d: _ft_options(d).update(redisAddress="logitfusion-redis:6380"))
    assert any("port '6380'" in e for e in errors), errors


def test_gcs_ft_check_refuses_a_redis_with_another_password():
    def other(docs):
        env = container(the(docs, "Deployment")["spec"]["template"])["env"]
        for item in env:
            item["valueFrom"]["secretKeyRef"]["key"] = "other"

    assert any("does not read the password" in e for e in _ft_errors(other))


def test_the_gcs_ft_variant_differs_from_the_plain_rayservice_only_where_intended():
    plain = copy.deepcopy(the(docs_of("rayservice.yaml"), "RayService"))
    ft = copy.deepcopy(the(docs_of("rayservice-gcs-ft.yaml"), "RayService"))
    del ft["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["metadata"].pop("name") == "logitfusion-ft"
    plain["metadata"].pop("name")
    assert ft == plain


# ---------------------------------------------------------------------------------------------------------------
# Cross-file consistency


def _all_manifests() -> dict[str, list[dict]]:
    return {p.name: ck.load_manifest(p) for p in ck.manifest_paths(K8S)}


def test_one_image_one_ray_version_and_every_reference_resolves():
    assert ck.consistency_errors(_all_manifests(), REPO) == []


def test_consistency_check_catches_drift():
    manifests = copy.deepcopy(_all_manifests())
    job = the(manifests["rayjob-eval.yaml"], "RayJob")
    head = container(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    head["image"] = "registry.example.com/logitfusion:0.0.9"
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.59.0"
    cluster = the(manifests["raycluster.yaml"], "RayCluster")["spec"]
    group(cluster, "small-gpu")["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "weights"
    errors = ck.consistency_errors(manifests, REPO)
    assert any("logitfusion:0.0.9" in e for e in errors)
    assert any("rayVersion '2.59.0'" in e for e in errors)
    assert any("PersistentVolumeClaim 'weights'" in e for e in errors)


# ---------------------------------------------------------------------------------------------------------------
# The image recipe


def test_the_dockerfile_installs_what_pyproject_declares():
    assert ck.dockerfile_errors(K8S / "Dockerfile", REPO) == []


def test_every_pyproject_dependency_is_pinned_in_requirements():
    import tomllib

    pins = ck.read_requirements(REPO / "requirements.txt")
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = ck.parse_requirement(dep)
        assert req.name in pins and ck.pinned_version(pins[req.name]), dep
        assert req.extras <= pins[req.name].extras, dep


def _dockerfile_errors(tmp_path: Path, edit, repo_root: Path = REPO) -> list[str]:
    text = edit((K8S / "Dockerfile").read_text())
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return ck.dockerfile_errors(path, repo_root)


def test_dockerfile_check_catches_requirements_not_installed(tmp_path):
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace(" \\\n && python -m pip install -r requirements.txt", ""))
    assert "requirements.txt is never installed with pip install -r" in errors
    assert any("'transformers" in e and "not installed" in e for e in errors), errors


def test_dockerfile_check_catches_a_pin_drift_and_build_isolation(tmp_path):
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace("torch==2.13.0", "torch==2.12.0"))
    assert any("torch==2.12.0" in e and "pins ==2.13.0" in e for e in errors), errors
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace("--no-build-isolation deepspeed", "deepspeed"))
    assert any("--no-build-isolation" in e for e in errors), errors


def test_dockerfile_check_catches_a_missing_project_install_or_configs(tmp_path):
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace("python -m pip install --no-deps .", "true"))
    assert "the project itself is never installed (`pip install .`)" in errors
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace("COPY --chown=1000:100 k8s/configs/ /app/configs/", ""))
    assert any("k8s/configs/ is not copied" in e for e in errors), errors


def test_dockerfile_check_catches_a_wrong_base_image(tmp_path):
    errors = _dockerfile_errors(tmp_path, lambda t: t.replace("ray:2.60.0-py311", "ray:2.50.0-py311"))
    assert any(e.startswith("FROM 'rayproject/ray:2.50.0") for e in errors), errors


def test_dockerfile_check_catches_a_dependency_pyproject_adds(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    text = (REPO / "pyproject.toml").read_text().replace('  "tqdm>=4.70",\n', '  "tqdm>=4.70",\n  "rich>=13",\n')
    (repo / "pyproject.toml").write_text(text)
    (repo / "requirements.txt").write_text((REPO / "requirements.txt").read_text().replace("ray[serve]==", "ray=="))
    errors = ck.dockerfile_errors(K8S / "Dockerfile", repo)
    assert "pyproject dependency 'rich>=13' is not installed by the Dockerfile" in errors
    assert any("ray[serve]" in e and "without extras ['serve']" in e for e in errors), errors


def test_dockerfile_parser_joins_continuations_and_skips_comments():
    text = (
        "# c\nFROM a:1\nRUN pip install x==1 \\\n  # inner comment\n && pip install -r r.txt\n"
        "COPY --chown=1:1 a b /d/\n"
    )
    instructions = ck.parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "COPY"]
    (first, second) = ck.pip_installs(instructions)
    assert first.requirements == ("x==1",) and second.requirement_files == ("r.txt",)
    assert ck.copies(instructions) == [(6, ["a", "b"], "/d/")]


def test_requirement_parsing():
    req = ck.parse_requirement("Ray[Serve]>=2.60,<2.61")
    assert (req.name, req.extras, req.specifier) == ("ray", frozenset({"serve"}), ">=2.60,<2.61")
    assert ck.parse_requirement("grpcio_tools==1.85.1").name == "grpcio-tools"
    assert ck.version_satisfies("2.60.0", ">=2.60,<2.61") and not ck.version_satisfies("2.61.0", ">=2.60,<2.61")


# ---------------------------------------------------------------------------------------------------------------
# README and the command line


def test_readme_mentions_every_manifest_and_only_existing_files():
    import re

    text = (K8S / "README.md").read_text()
    for path in ck.manifest_paths(K8S):
        assert f"k8s/{path.name}" in text, path.name
    for mentioned in set(re.findall(r"k8s/[\w./-]+\.(?:yaml|py|md)|k8s/Dockerfile", text)):
        assert (REPO / mentioned).exists(), mentioned
    assert "serve-grpc" in text and "logitfusion-head-svc" in text and "logitfusion generate" in text


def test_main_prints_one_line_per_problem_and_fails_on_any(monkeypatch, capsys):
    monkeypatch.setattr(ck, "check_all", lambda *a, **k: {"a.yaml": [], "b.yaml": ["one", "two"]})
    assert ck.main([]) == 1
    assert capsys.readouterr().out.splitlines() == ["a.yaml: ok", "b.yaml: one", "b.yaml: two"]
    monkeypatch.setattr(ck, "check_all", lambda *a, **k: {"a.yaml": []})
    assert ck.main([]) == 0


# ---------------------------------------------------------------------------------------------------------------
# Network policies


def _with_policies(edit) -> dict[str, list[dict]]:
    manifests = copy.deepcopy(_all_manifests())
    edit({d["metadata"]["name"]: d for d in manifests["networkpolicy.yaml"]})
    return manifests


def test_network_policies_cover_every_serving_pod_and_the_redis():
    assert ck.network_policy_errors(_all_manifests()) == []


def test_label_selector_matching():
    labels = {"app": "lf", "tier": "head"}
    assert ck.selects({}, labels) and ck.selects({"matchLabels": {"app": "lf"}}, labels)
    assert not ck.selects({"matchLabels": {"app": "other"}}, labels)
    expr = {"key": "tier", "operator": "In", "values": ["head", "worker"]}
    assert ck.selects({"matchExpressions": [expr]}, labels)
    assert not ck.selects({"matchExpressions": [dict(expr, operator="NotIn")]}, labels)
    assert ck.selects({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, labels)
    assert not ck.selects({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, labels)


def test_network_policy_check_needs_the_ray_pods_admitted_from_each_other():
    broken = _with_policies(lambda p: p["logitfusion-ray"]["spec"]["ingress"].pop(0))
    assert any("every Ray pod of the cluster on every port" in e for e in ck.network_policy_errors(broken))


def test_network_policy_check_needs_clients_admitted_to_the_grpc_port():
    def edit(p):
        p["logitfusion-ray"]["spec"]["ingress"][1]["ports"] = [{"protocol": "TCP", "port": "serve"}]
    assert any("gRPC ingress port 'serve-grpc'" in e for e in ck.network_policy_errors(_with_policies(edit)))


def test_network_policy_check_catches_a_misspelled_named_port():
    def edit(p):
        p["logitfusion-ray"]["spec"]["ingress"][1]["ports"][0]["port"] = "serve-grcp"
    errors = ck.network_policy_errors(_with_policies(edit))
    assert any("named port 'serve-grcp' is declared by no pod" in e for e in errors)


def test_network_policy_check_catches_an_unselected_worker_group():
    def edit(p):
        p["logitfusion-ray"]["spec"]["podSelector"]["matchExpressions"][0]["values"] = ["ray-head", "ray-worker-small"]
    errors = ck.network_policy_errors(_with_policies(edit))
    assert any("ray-worker-large" in e and "no NetworkPolicy in k8s/ selects this pod" in e for e in errors), errors


def test_network_policy_check_catches_a_redis_open_to_the_namespace_and_an_open_rule():
    def edit(p):
        p["logitfusion-redis"]["spec"]["ingress"][0]["from"].append({"podSelector": {}})
        p["logitfusion-ray"]["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]})
    errors = ck.network_policy_errors(_with_policies(edit))
    assert any("Redis admits peers other than the Ray pods" in e for e in errors)
    assert any("without `from` admits anyone" in e for e in errors)
