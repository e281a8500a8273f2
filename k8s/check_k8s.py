"""Offline checks for the KubeRay manifests and the image recipe in k8s/ (no cluster, no docker needed).

    python k8s/check_k8s.py            # every check below, one line per problem, exit status 1 if any

What it checks, and why each one exists:
- every document of every k8s/*.yaml validates: the KubeRay kinds against the CRD JSON schemas in
  ../shared/k8s-schemas (or $LOGITFUSION_K8S_SCHEMAS), the core kinds and every embedded pod template against the
  upstream Kubernetes schemas bundled by `kubernetes-validate` (strict: unknown fields are errors);
- the RayService's serveConfigV2 validates against Ray Serve's ServeDeploySchema AND has no key that schema does
  not know (pydantic ignores unknown keys, so `num_replica: 4` would otherwise deploy one replica silently);
- every import path the Serve config names (application builder, gRPC servicer functions) and the RayJob's
  `python -m` module imports from the installed project;
- the cluster layout matches the topology file each manifest points at (GPUs per pod = tp_size x num_gpus, enough
  pods per group), the gRPC port agrees everywhere, requests equal limits, probes and graceful termination exist;
- the RayJob's evaluation config loads (its methods apply to its tasks), its pipeline actors fit the workers, and
  its output_dir is on a volume that every Ray pod mounts and that outlives the cluster;
- the GCS fault-tolerance variant reads its Redis password from the Secret it ships, and the Redis it points at
  exists in the same file;
- the Dockerfile installs every dependency pyproject.toml declares, with the pins of requirements.txt, and the
  project itself;
- the NetworkPolicies select every pod of the serving RayService (Serve's proxies bind every interface), admit the
  cluster's Ray pods from each other on every port (or Ray breaks), admit clients to the gRPC ingress port and only
  to named ports the selected pods declare, and select the GCS fault-tolerance Redis, admitting only Ray pods.
Each check is a function returning a list of messages (empty = fine), so tests can feed it broken copies.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import math
import os
import re
import shlex
import sys
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parent
REPO_ROOT = K8S_DIR.parent
SCHEMAS_ENV = "LOGITFUSION_K8S_SCHEMAS"
KUBERNETES_VERSION = "1.33.0"  # the API version core objects are validated against
CRD_KINDS = frozenset({"RayCluster", "RayJob", "RayService"})
CORE_KINDS = frozenset({"Secret", "Service", "Deployment", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy"})
IMAGE_CONFIG_DIR = "/app/configs"  # where the Dockerfile copies k8s/configs/
GPU = "nvidia.com/gpu"
GRPC_PORT_NAME = "serve-grpc"

Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def manifest_paths(k8s_dir: Path = K8S_DIR) -> list[Path]:
    """Every manifest: the YAML files directly in k8s/ (k8s/configs/ holds topology files, not manifests)."""
    return sorted(k8s_dir.glob("*.yaml"))


def load_documents(text: str) -> list[Doc]:
    """The non-empty documents of a multi-document YAML text; each must be a mapping."""
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    for index, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"document {index} is a {type(doc).__name__}, expected a mapping")
    return docs


def load_manifest(path: Path) -> list[Doc]:
    return load_documents(path.read_text(encoding="utf-8"))


def describe(doc: Doc) -> str:
    """`Kind/name` for messages."""
    name = (doc.get("metadata") or {}).get("name", "?")
    return f"{doc.get('kind', '?')}/{name}"


def schema_dir(repo_root: Path = REPO_ROOT, environ: Mapping[str, str] = os.environ) -> Path | None:
    """$LOGITFUSION_K8S_SCHEMAS if set, else <repo>/../shared/k8s-schemas; None when neither exists."""
    candidates = [Path(environ[SCHEMAS_ENV])] if environ.get(SCHEMAS_ENV) else []
    candidates.append(repo_root.parent / "shared" / "k8s-schemas")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------------
# Schema validation


def _json_path(parts: typing.Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "<root>"


def crd_errors(doc: Doc, schemas: Path) -> list[str]:
    """Validate a RayCluster/RayJob/RayService against the KubeRay CRD schema `<kind>_<version>.json`."""
    import jsonschema

    version = str(doc.get("apiVersion", "")).rpartition("/")[2]
    schema_file = schemas / f"{str(doc.get('kind', '')).lower()}_{version}.json"
    if not schema_file.is_file():
        return [f"{describe(doc)}: no schema {schema_file.name} in {schemas}"]
    validator = jsonschema.Draft7Validator(json.loads(schema_file.read_text(encoding="utf-8")))
    return [
        f"{describe(doc)}: {_json_path(error.absolute_path)}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def core_errors(doc: Doc, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate a core Kubernetes object strictly against the upstream schema (kubernetes-validate)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{describe(doc)}: {_json_path(error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{describe(doc)}: no Kubernetes {kubernetes_version} schema for {doc.get('apiVersion')}"]
    return []


def ray_cluster_spec(doc: Doc) -> Doc | None:
    """The RayCluster spec inside a KubeRay object (None for other kinds)."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        return spec
    if kind == "RayService":
        return spec.get("rayClusterConfig")
    if kind == "RayJob":
        return spec.get("rayClusterSpec")
    return None


def cluster_templates(cluster: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) of the head and every worker group of a RayCluster spec."""
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if isinstance(head, dict):
        yield "headGroupSpec", head
    for group in cluster.get("workerGroupSpecs") or []:
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            yield f"workerGroupSpecs[{group.get('groupName')}]", group["template"]


def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) for every pod template a document embeds."""
    cluster = ray_cluster_spec(doc)
    if cluster is not None:
        yield from cluster_templates(cluster)
    if doc.get("kind") == "Deployment":
        template = (doc.get("spec") or {}).get("template")
        if isinstance(template, dict):
            yield "spec.template", template


def pod_template_errors(doc: Doc, kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Validate each embedded pod template as a core v1 PodTemplate: the CRD schema checks field names, this also
    checks what only the upstream schema knows (e.g. quantity formats of the pod spec)."""
    errors = []
    for where, template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        errors += [f"{describe(doc)} {where}: {e.split(': ', 1)[1]}" for e in core_errors(wrapped, kubernetes_version)]
    return errors


def document_errors(doc: Doc, schemas: Path) -> list[str]:
    """Schema errors of one document, whatever its kind."""
    kind = doc.get("kind")
    if kind in CRD_KINDS:
        return crd_errors(doc, schemas) + pod_template_errors(doc)
    if kind in CORE_KINDS:
        return core_errors(doc)
    return [f"{describe(doc)}: kind {kind!r} is not checked by check_k8s.py; add it to CRD_KINDS or CORE_KINDS"]


# ---------------------------------------------------------------------------------------------------------------
# Ray Serve config: schema + unknown keys + imports


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] layers."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and hasattr(annotation, "model_fields")


def _accepted_keys(model: Any) -> dict[str, Any]:
    """Key -> annotation for every key a pydantic (v2) model accepts: field names and their aliases."""
    keys: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        keys[name] = field.annotation
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                keys[alias] = field.annotation
    return keys


def unknown_keys(value: Any, annotation: Any, path: str = "") -> list[str]:
    """Keys in `value` that the type `annotation` does not declare, walking nested models, lists, dicts and unions.

    Free-form mappings (a bare `dict`/`Dict`, e.g. `args`, `runtime_env`, `user_config`) are not looked into. In a
    union that offers a model, a mapping value is checked against the model arms (Ray turns such a dict into that
    model later), so `autoscaling_config: {min_replica: 1}` is caught although `Dict` would also accept it.
    """
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_model(annotation):
        if not isinstance(value, Mapping):
            return []  # a wrong type is the schema's business
        accepted = _accepted_keys(annotation)
        open_model = annotation.model_config.get("extra") == "allow"  # such a model keeps unknown keys on purpose
        errors = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in accepted:
                errors += unknown_keys(item, accepted[key], where)
                continue
            if open_model:
                continue
            close = difflib.get_close_matches(str(key), list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{where}: unknown key for {annotation.__name__}{hint}")
        return errors
    if origin in (typing.Union, types.UnionType):
        arms = [_unwrap(arm) for arm in args if arm is not type(None)]
        if isinstance(value, Mapping) and any(_is_model(arm) for arm in arms):
            arms = [arm for arm in arms if _is_model(arm)]
        results = [unknown_keys(value, arm, path) for arm in arms]
        return min(results, key=len) if results else []
    origin_name = getattr(origin, "__name__", "")
    if origin in (list, tuple, set, frozenset) or origin_name == "Sequence":
        if not isinstance(value, (list, tuple)) or not args:
            return []
        errors = []
        for index, item in enumerate(value):
            errors += unknown_keys(item, args[0], f"{path}[{index}]")
        return errors
    if origin in (dict, Mapping) or origin_name == "Mapping":
        if not isinstance(value, Mapping) or len(args) != 2:
            return []
        errors = []
        for key, item in value.items():
            errors += unknown_keys(item, args[1], f"{path}.{key}")
        return errors
    return []


def parse_serve_config(text: str) -> Doc:
    config = yaml.safe_load(text)
    if not isinstance(config, dict):
        raise ValueError(f"serveConfigV2 is a {type(config).__name__}, expected a mapping")
    return config


def serve_config_errors(text: str) -> list[str]:
    """serveConfigV2 (YAML text) against ServeDeploySchema, plus the unknown-key walk."""
    import pydantic
    from ray.serve.schema import ServeDeploySchema

    try:
        config = parse_serve_config(text)
    except (yaml.YAMLError, ValueError) as error:
        return [f"serveConfigV2: not valid YAML: {error}"]
    errors = [f"serveConfigV2: {key}" for key in unknown_keys(config, ServeDeploySchema)]
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError as error:
        for item in error.errors():
            errors.append(f"serveConfigV2: {_json_path(item['loc'])}: {item['msg']}")
    return errors


def import_object(target: str) -> Any:
    """Import `pkg.module:attr` or `pkg.module.attr` (the two forms Ray Serve accepts)."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def import_error(target: str, what: str) -> list[str]:
    try:
        obj = import_object(target)
    except Exception as error:  # any failure to import is the finding
        return [f"{what} {target!r} does not import: {type(error).__name__}: {error}"]
    if not callable(obj):
        return [f"{what} {target!r} is a {type(obj).__name__}, not callable"]
    return []


def serve_import_targets(config: Doc) -> list[tuple[str, str]]:
    """(what, import path) for every application builder and gRPC servicer function of a Serve config."""
    targets = [("import_path", app["import_path"]) for app in config.get("applications") or [] if "import_path" in app]
    grpc = config.get("grpc_options") or {}
    targets += [("grpc_servicer_function", f) for f in grpc.get("grpc_servicer_functions") or []]
    return targets


def serve_import_errors(config: Doc) -> list[str]:
    errors = []
    for what, target in serve_import_targets(config):
        errors += import_error(target, what)
    return errors


def entrypoint_module(entrypoint: str) -> str | None:
    """The module of a `python -m module ...` entrypoint, else None."""
    words = shlex.split(entrypoint)
    for index, word in enumerate(words[:-1]):
        if word == "-m" and Path(words[0]).name.startswith("python"):
            return words[index + 1]
    return None


def entrypoint_config(entrypoint: str) -> str | None:
    """The value of `--config` in an entrypoint command line."""
    words = shlex.split(entrypoint)
    for index, word in enumerate(words):
        if word == "--config" and index + 1 < len(words):
            return words[index + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def entrypoint_errors(doc: Doc) -> list[str]:
    """A RayJob's entrypoint must be `python -m <module> ...` with a module that imports."""
    entrypoint = (doc.get("spec") or {}).get("entrypoint", "")
    module = entrypoint_module(entrypoint)
    if module is None:
        return [f"{describe(doc)}: entrypoint {entrypoint!r} is not `python -m <module> ...`"]
    try:
        importlib.import_module(module)
    except Exception as error:
        return [f"{describe(doc)}: entrypoint module {module!r} does not import: {type(error).__name__}: {error}"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Topology files (k8s/configs/*.yaml) and the GPU layout they imply


@dataclasses.dataclass(frozen=True)
class GpuNeeds:
    """Pods one fusion pipeline needs: a pod per single-GPU model, and per multi-GPU model one pod holding all its
    shards (tensor-parallel shards must share one Ray node)."""

    pods: dict[int, int]  # GPUs per pod -> pods per pipeline
    cpus: dict[int, float]  # GPUs per pod -> CPUs such a pod must offer (shards + the pipeline's coordinator)


def topology_path(image_path: str, k8s_dir: Path = K8S_DIR) -> Path | None:
    """The repo file behind a path inside the image (the Dockerfile copies k8s/configs/ to /app/configs/)."""
    prefix = IMAGE_CONFIG_DIR.rstrip("/") + "/"
    if not image_path.startswith(prefix):
        return None
    return k8s_dir / "configs" / image_path[len(prefix) :]


def load_topology_file(path: Path) -> tuple[Any, list[str]]:
    """(Topology, []) through the project's own loader, or (None, [its error]): the very checks the service runs."""
    try:
        from logitfusion.cluster.topology import load_topology
        from logitfusion.errors import ConfigError
    except Exception as error:
        return None, [f"cannot import the topology loader: {type(error).__name__}: {error}"]
    try:
        return load_topology(path), []
    except ConfigError as error:
        return None, [str(error)]


def gpu_needs(topology: Any) -> tuple[GpuNeeds, list[str]]:
    """What one pipeline of a GPU topology needs from the worker groups."""
    from logitfusion.cluster.topology import shard_gpus

    pods: dict[int, int] = {}
    cpus: dict[int, float] = {}
    errors = []
    for model in topology.models:
        per_shard = shard_gpus(model, num_gpus_available=1)
        gpus = model.tp_size * per_shard
        if gpus < 1 or gpus != int(gpus):
            errors.append(f"models.{model.name}: tp_size x num_gpus = {gpus}; a GPU deployment needs a whole "
                          "number >= 1 of GPUs per model")
            continue
        pods[int(gpus)] = pods.get(int(gpus), 0) + 1
        need = model.tp_size * model.num_cpus + topology.serve.coordinator_num_cpus
        cpus[int(gpus)] = max(cpus.get(int(gpus), 0.0), need)
    return GpuNeeds(pods=pods, cpus=cpus), errors


def quantity(value: Any) -> float:
    """A Kubernetes quantity as a number (CPU in cores, memory in bytes): '500m' -> 0.5, '16Gi' -> 16 * 2**30."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    if not match or (match.group(2) and match.group(2) not in units):
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * units.get(match.group(2), 1.0)


def ray_container(template: Doc) -> Doc:
    """KubeRay's rule: the Ray container is the first container of the pod."""
    return (template.get("spec") or {}).get("containers", [{}])[0]


def group_gpus(group: Doc) -> int:
    limits = (ray_container(group["template"]).get("resources") or {}).get("limits") or {}
    return int(quantity(limits.get(GPU, 0)))


def group_cpus(group: Doc) -> float:
    limits = (ray_container(group["template"]).get("resources") or {}).get("limits") or {}
    return quantity(limits.get("cpu", 0))


def group_capacity(group: Doc) -> int:
    """Pods a group can have: maxReplicas when the autoscaler is on, else replicas."""
    return int(group.get("maxReplicas", group.get("replicas", 0)) or 0)


def layout_errors(cluster: Doc, topology: Any, where: str, autoscaling: bool) -> list[str]:
    """Do the worker groups fit `serve.replicas` pipelines of this topology?"""
    needs, errors = gpu_needs(topology)
    pipelines = topology.serve.replicas
    by_gpus: dict[int, list[Doc]] = {}
    for group in cluster.get("workerGroupSpecs") or []:
        by_gpus.setdefault(group_gpus(group), []).append(group)
    for gpus, pods_per_pipeline in sorted(needs.pods.items()):
        matching = by_gpus.get(gpus, [])
        if not matching:
            errors.append(
                f"{where}: the topology needs pods with {gpus} GPU(s) (tp_size x num_gpus) but no worker group has "
                f"{GPU}={gpus}; the groups have {sorted(by_gpus)}"
            )
            continue
        have = sum(group_capacity(g) if autoscaling else int(g.get("replicas", 0)) for g in matching)
        if have < pods_per_pipeline * pipelines:
            errors.append(
                f"{where}: groups {[g.get('groupName') for g in matching]} provide {have} pod(s) with {gpus} GPU(s); "
                f"serve.replicas={pipelines} pipeline(s) need {pods_per_pipeline * pipelines}"
            )
        for group in matching:
            if group_cpus(group) < needs.cpus[gpus]:
                errors.append(
                    f"{where}: group {group.get('groupName')} has {group_cpus(group):g} CPUs; a model placed there "
                    f"plus the coordinator need {needs.cpus[gpus]:g} (tp_size x num_cpus + coordinator_num_cpus)"
                )
    extra = sorted(set(by_gpus) - set(needs.pods) - {0})
    if extra:
        errors.append(f"{where}: worker groups with {extra} GPUs per pod match no model of the topology")
    # The placement groups the Serve app reserves: topology.bundles() per pipeline (the head has num-cpus 0).
    cluster_gpus = sum(group_gpus(g) * (group_capacity(g) if autoscaling else int(g.get("replicas", 0)))
                       for g in cluster.get("workerGroupSpecs") or [])
    bundles = topology.bundles(num_gpus_available=cluster_gpus / max(1, pipelines))
    for resource, per_pod in (("GPU", group_gpus), ("CPU", group_cpus)):
        wanted_total = pipelines * sum(b.get(resource, 0.0) for b in bundles)
        have_total = sum(per_pod(g) * (group_capacity(g) if autoscaling else int(g.get("replicas", 0)))
                         for g in cluster.get("workerGroupSpecs") or [])
        if have_total < wanted_total:
            errors.append(f"{where}: the worker groups offer {have_total:g} {resource}; {pipelines} pipeline(s) of "
                          f"placement-group bundles {bundles} need {wanted_total:g}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster hygiene: resources, probes, termination, ports


def container_resource_errors(container: Doc, where: str, expect_gpu: bool) -> list[str]:
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    errors = []
    for key in ("cpu", "memory"):
        if key not in limits or key not in requests:
            errors.append(f"{where}: resources must set both requests and limits for {key}")
    for key in sorted(set(requests) | set(limits)):
        if key in requests and key in limits and quantity(requests[key]) != quantity(limits[key]):
            errors.append(f"{where}: requests.{key}={requests[key]} != limits.{key}={limits[key]}")
    if expect_gpu and quantity(limits.get(GPU, 0)) < 1:
        errors.append(f"{where}: a GPU worker group must limit {GPU} to >= 1")
    if not expect_gpu and GPU in limits:
        errors.append(f"{where}: the head must not take GPUs (it runs no model)")
    return errors


def prestop_grace_s(container: Doc) -> int | None:
    """The `ray stop --grace-period N` of the preStop hook (0 if ray stop has no grace period), else None."""
    command = ((((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")) or []
    line = " ".join(command)
    if "ray stop" not in line:
        return None
    match = re.search(r"--grace-period[ =](\d+)|-g (\d+)", line)
    return int(next(g for g in match.groups() if g)) if match else 0


def pod_hygiene_errors(doc: Doc) -> list[str]:
    """Requests = limits, probes, graceful termination on every Ray pod of a KubeRay object."""
    errors = []
    for where, template in pod_templates(doc):
        at = f"{describe(doc)} {where}"
        container = ray_container(template)
        errors += container_resource_errors(container, at, expect_gpu=where != "headGroupSpec")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                errors.append(f"{at}: the Ray container has no {probe}")
        grace = prestop_grace_s(container)
        period = (template.get("spec") or {}).get("terminationGracePeriodSeconds")
        if grace is None:
            errors.append(f"{at}: no preStop hook running `ray stop`")
        if period is None:
            errors.append(f"{at}: terminationGracePeriodSeconds is not set")
        elif grace is not None and period <= grace:
            errors.append(f"{at}: terminationGracePeriodSeconds={period} must exceed the preStop grace {grace}s")
    return errors


def head_ports(cluster: Doc) -> dict[str, int]:
    container = ray_container((cluster.get("headGroupSpec") or {}).get("template") or {})
    return {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}


def rayservice_errors(doc: Doc, k8s_dir: Path = K8S_DIR, check_imports: bool = True) -> list[str]:
    """Serve config, imports, upgrade strategy, gRPC port and GPU layout of a RayService."""
    spec = doc.get("spec") or {}
    at = describe(doc)
    errors = []
    strategy = (spec.get("upgradeStrategy") or {}).get("type")
    if strategy != "NewCluster":
        errors.append(f"{at}: upgradeStrategy.type is {strategy!r}; must be 'NewCluster' (incremental upgrades "
                      "move HTTP traffic only, not gRPC)")
    text = spec.get("serveConfigV2")
    if not isinstance(text, str):
        return errors + [f"{at}: serveConfigV2 must be a YAML string"]
    errors += [f"{at}: {e}" for e in serve_config_errors(text)]
    try:
        config = parse_serve_config(text)
    except (yaml.YAMLError, ValueError):
        return errors
    if check_imports:
        errors += [f"{at}: {e}" for e in serve_import_errors(config)]
    cluster = spec.get("rayClusterConfig") or {}
    ports = head_ports(cluster)
    grpc_port = (config.get("grpc_options") or {}).get("port")
    if "serve" not in ports:
        errors.append(f"{at}: the head container needs a port named 'serve' (KubeRay builds the serve service)")
    if ports.get(GRPC_PORT_NAME) != grpc_port:
        errors.append(f"{at}: head port {GRPC_PORT_NAME!r} is {ports.get(GRPC_PORT_NAME)}, grpc_options.port is "
                      f"{grpc_port}")
    for app in config.get("applications") or []:
        errors += topology_link_errors((app.get("args") or {}).get("config"), cluster, f"{at} app {app.get('name')}",
                                       grpc_port, autoscaling=bool(cluster.get("enableInTreeAutoscaling")),
                                       k8s_dir=k8s_dir, app_name=app.get("name"))
    return errors


def topology_link_errors(image_path: Any, cluster: Doc, at: str, grpc_port: Any, autoscaling: bool,
                         k8s_dir: Path = K8S_DIR, app_name: str | None = None) -> list[str]:
    """The topology file named by a manifest is in k8s/configs/, loads, and fits the cluster."""
    if not isinstance(image_path, str):
        return [f"{at}: names no topology file (args.config / --config)"]
    path = topology_path(image_path, k8s_dir)
    if path is None or not path.is_file():
        return [f"{at}: {image_path} is not a file the image gets from k8s/configs/ ({IMAGE_CONFIG_DIR}/...)"]
    where = f"{at} ({path.relative_to(k8s_dir.parent)})"
    topology, errors = load_topology_file(path)
    if topology is None:
        return [f"{where}: {e}" for e in errors]
    if grpc_port is not None and topology.serve.grpc_port != grpc_port:
        errors.append(f"{where}: serve.grpc_port {topology.serve.grpc_port} != grpc_options.port {grpc_port}")
    if app_name is not None and topology.serve.app_name != app_name:
        errors.append(f"{where}: serve.app_name {topology.serve.app_name!r} != the Serve application name "
                      f"{app_name!r} (the Serve app and the topology must agree on it)")
    return errors + layout_errors(cluster, topology, where, autoscaling)


def load_eval_config(path: Path) -> tuple[Any, list[str]]:
    """(EvalConfig, []) through the evaluation's own loader, with its work units built (so every method must apply
    to its task), or (None, [the error])."""
    try:
        from logitfusion.cluster.evaluate import EvalConfig, make_units
    except Exception as error:
        return None, [f"cannot import the evaluation config: {type(error).__name__}: {error}"]
    try:
        config = EvalConfig.load(path)
        make_units(config)
    except (ValueError, FileNotFoundError) as error:  # pydantic's ValidationError is a ValueError
        return None, [" ".join(str(error).split())]
    return config, []


def eval_layout_errors(cluster: Doc, config: Any, where: str, autoscaling: bool) -> list[str]:
    """Can the worker groups hold `pipelines` pipeline actors of pipeline_num_cpus / pipeline_num_gpus each?"""
    fits = 0
    for group in cluster.get("workerGroupSpecs") or []:
        per_pod = math.floor(group_cpus(group) / config.pipeline_num_cpus + 1e-9)
        if config.pipeline_num_gpus > 0:
            per_pod = min(per_pod, math.floor(group_gpus(group) / config.pipeline_num_gpus + 1e-9))
        fits += per_pod * (group_capacity(group) if autoscaling else int(group.get("replicas", 0)))
    if fits < config.pipelines:
        return [f"{where}: the worker groups hold {fits} pipeline actor(s) of {config.pipeline_num_cpus:g} CPU and "
                f"{config.pipeline_num_gpus:g} GPU; pipelines={config.pipelines}"]
    return []


def shared_volume_errors(cluster: Doc, path: str, where: str) -> list[str]:
    """`path` must lie on a writable PersistentVolumeClaim mount in the head and in every worker group: the driver
    writes there, the workers read what it wrote, and the data must outlive the cluster."""
    if not path.startswith("/"):
        return [f"{where}: output_dir {path!r} must be an absolute path on the shared results volume"]
    errors = []
    for place, template in cluster_templates(cluster):
        spec = template.get("spec") or {}
        claims = {v.get("name") for v in spec.get("volumes") or [] if v.get("persistentVolumeClaim")}
        mounts = [m for m in ray_container(template).get("volumeMounts") or []
                  if m.get("name") in claims and not m.get("readOnly")
                  and (path.rstrip("/") + "/").startswith(str(m.get("mountPath", "")).rstrip("/") + "/")]
        if not mounts:
            errors.append(f"{where} {place}: output_dir {path} is not on a writable PersistentVolumeClaim mount")
    return errors


def rayjob_errors(doc: Doc, k8s_dir: Path = K8S_DIR, check_imports: bool = True) -> list[str]:
    """The entrypoint imports; its --config is an evaluation config from k8s/configs/ that loads, fits the cluster
    and writes to a volume every Ray pod shares."""
    spec = doc.get("spec") or {}
    at = describe(doc)
    errors = entrypoint_errors(doc) if check_imports else []
    image_path = entrypoint_config(spec.get("entrypoint", ""))
    if image_path is None:
        return errors + [f"{at}: the entrypoint names no --config"]
    path = topology_path(image_path, k8s_dir)
    if path is None or not path.is_file():
        return errors + [f"{at}: {image_path} is not a file the image gets from k8s/configs/ ({IMAGE_CONFIG_DIR}/...)"]
    where = f"{at} ({path.relative_to(k8s_dir.parent)})"
    config, problems = load_eval_config(path)
    if config is None:
        return errors + [f"{where}: {p}" for p in problems]
    cluster = spec.get("rayClusterSpec") or {}
    errors += eval_layout_errors(cluster, config, where, autoscaling=bool(cluster.get("enableInTreeAutoscaling")))
    return errors + shared_volume_errors(cluster, config.output_dir, where)


def raycluster_errors(doc: Doc, topology_image_path: str, eval_image_path: str, k8s_dir: Path = K8S_DIR) -> list[str]:
    """A standalone RayCluster must be able to host the serving topology and run the evaluation (README shows both),
    within its autoscaling bounds."""
    cluster = doc.get("spec") or {}
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    errors = topology_link_errors(topology_image_path, cluster, describe(doc), None, autoscaling=autoscaling,
                                  k8s_dir=k8s_dir)
    path = topology_path(eval_image_path, k8s_dir)
    config, problems = load_eval_config(path) if path is not None else (None, [f"{eval_image_path}: not in configs"])
    where = f"{describe(doc)} ({eval_image_path})"
    if config is None:
        return errors + [f"{where}: {p}" for p in problems]
    errors += eval_layout_errors(cluster, config, where, autoscaling)
    return errors + shared_volume_errors(cluster, config.output_dir, where)


# ---------------------------------------------------------------------------------------------------------------
# GCS fault tolerance: Redis address and password wiring


def _template_labels(doc: Doc) -> dict[str, str]:
    return ((((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")) or {}


def _secret_env_refs(doc: Doc) -> set[tuple[Any, Any]]:
    """(secret name, key) of every env var of every container of a Deployment that reads a Secret."""
    containers = (((doc.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    refs = [(env.get("valueFrom") or {}).get("secretKeyRef") for c in containers for env in c.get("env") or []]
    return {(r.get("name"), r.get("key")) for r in refs if r}


def gcs_ft_errors(docs: list[Doc]) -> list[str]:
    """Every gcsFaultToleranceOptions reads its password from a Secret key shipped in the same file and points at a
    Service of the same file that fronts a Redis Deployment using that same Secret key."""
    by_kind: dict[str, dict[str, Doc]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", ""), {})[(doc.get("metadata") or {}).get("name")] = doc
    errors = []
    for doc in docs:
        cluster = ray_cluster_spec(doc)
        options = (cluster or {}).get("gcsFaultToleranceOptions")
        if not options:
            continue
        at = f"{describe(doc)} gcsFaultToleranceOptions"
        password = options.get("redisPassword") or {}
        if "value" in password:
            errors.append(f"{at}: redisPassword.value puts the password in the manifest; use valueFrom.secretKeyRef")
        ref = (password.get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            errors.append(f"{at}: redisPassword must come from valueFrom.secretKeyRef")
        else:
            secret = by_kind.get("Secret", {}).get(ref.get("name"))
            keys = set((secret or {}).get("stringData") or {}) | set((secret or {}).get("data") or {})
            if secret is None:
                errors.append(f"{at}: Secret {ref.get('name')!r} is not in this file")
            elif ref.get("key") not in keys:
                errors.append(f"{at}: Secret {ref.get('name')!r} has no key {ref.get('key')!r}")
        host, _, port = str(options.get("redisAddress", "")).removeprefix("redis://").partition(":")
        service = by_kind.get("Service", {}).get(host)
        if service is None:
            errors.append(f"{at}: redisAddress {options.get('redisAddress')!r} names no Service in this file")
            continue
        if not any(str(p.get("port")) == port for p in (service.get("spec") or {}).get("ports") or []):
            errors.append(f"{at}: Service {host!r} does not expose port {port!r}")
        selector = (service.get("spec") or {}).get("selector") or {}
        backends = [d for d in by_kind.get("Deployment", {}).values()
                    if selector and selector.items() <= _template_labels(d).items()]
        if not backends:
            errors.append(f"{at}: Service {host!r} selects no Deployment in this file")
        for backend in backends:
            if ref and (ref.get("name"), ref.get("key")) not in _secret_env_refs(backend):
                errors.append(f"{at}: Redis {describe(backend)} does not read the password from the same Secret key")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Network policies


def selects(selector: Doc | None, labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels + matchExpressions) selects ``labels``; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), [str(v) for v in expr.get("values") or []]
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False)
        if not ok:
            return False
    return True


def _labels(template: Doc) -> dict[str, str]:
    return {k: str(v) for k, v in ((template.get("metadata") or {}).get("labels") or {}).items()}


def _container_ports(template: Doc) -> set[Any]:
    """Names and numbers of every containerPort of a pod template."""
    out: set[Any] = set()
    for c in (template.get("spec") or {}).get("containers") or []:
        for port in c.get("ports") or []:
            out |= {port.get("name"), port.get("containerPort")} - {None}
    return out


def _peer_selects(peer: Doc, labels: Mapping[str, str]) -> bool:
    """A `from` peer of the policy's own namespace (no namespaceSelector, no ipBlock) that selects ``labels``."""
    return "namespaceSelector" not in peer and "ipBlock" not in peer and selects(peer.get("podSelector"), labels)


def _policy_rules(policy: Doc) -> list[Doc]:
    return (policy.get("spec") or {}).get("ingress") or []


def network_policy_errors(manifests: dict[str, list[Doc]]) -> list[str]:
    """See the module docstring. The serving pods are the pod templates of every RayService; Redis is every
    Deployment whose template has the label app.kubernetes.io/component: redis."""
    policies = [(f"{name} {describe(d)}", d) for name, docs in manifests.items() for d in docs
                if d.get("kind") == "NetworkPolicy"]
    ray_pods = [(f"{name} {describe(d)} {where}", t) for name, docs in manifests.items() for d in docs
                if d.get("kind") == "RayService" for where, t in pod_templates(d)]
    redis_pods = [(f"{name} {describe(d)}", t) for name, docs in manifests.items() for d in docs
                  if d.get("kind") == "Deployment" for _, t in pod_templates(d)
                  if _labels(t).get("app.kubernetes.io/component") == "redis"]
    errors = []

    def admits_ray_pods(rule: Doc) -> bool:
        return all(any(_peer_selects(f, _labels(t)) for f in rule.get("from") or []) for _, t in ray_pods)

    for at, policy in policies:  # named ports must exist on some pod the policy selects
        selected = [t for _, t in ray_pods + redis_pods
                    if selects((policy.get("spec") or {}).get("podSelector"), _labels(t))]
        declared = set().union(*(_container_ports(t) for t in selected)) if selected else set()
        for i, rule in enumerate(_policy_rules(policy)):
            for port in rule.get("ports") or []:
                if isinstance(port.get("port"), str) and port["port"] not in declared:
                    errors.append(f"{at} ingress[{i}]: named port {port['port']!r} is declared by no pod it selects")
    for at, template in ray_pods + redis_pods:
        labels = _labels(template)
        mine = [p for _, p in policies if selects((p.get("spec") or {}).get("podSelector"), labels)
                and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])]
        if not mine:
            errors.append(f"{at}: no NetworkPolicy in k8s/ selects this pod (labels {labels}): anyone can reach it")
            continue
        rules = [r for p in mine for r in _policy_rules(p)]
        if any(not r.get("from") for r in rules):
            errors.append(f"{at}: an ingress rule without `from` admits anyone")
        if (at, template) in redis_pods:
            if not any(admits_ray_pods(r) for r in rules):
                errors.append(f"{at}: no ingress rule admits the Ray pods to Redis")
            strangers = [f for r in rules for f in r.get("from") or []
                         if "namespaceSelector" in f or "ipBlock" in f or not (f.get("podSelector") or {})
                         or not any(selects(f.get("podSelector"), _labels(t)) for _, t in ray_pods)]
            if strangers:
                errors.append(f"{at}: Redis admits peers other than the Ray pods: {strangers}")
            continue
        if not any(admits_ray_pods(r) and not r.get("ports") for r in rules):
            errors.append(f"{at}: no ingress rule admits every Ray pod of the cluster on every port (Ray's GCS, "
                          "raylets, workers and the coordinator-to-worker streams use dynamic ports)")
        ports = _container_ports(template)
        if GRPC_PORT_NAME in ports and not any(
            not admits_ray_pods(r) and any(p.get("port") in (GRPC_PORT_NAME, 9000) for p in r.get("ports") or [])
            for r in rules
        ):
            errors.append(f"{at}: no ingress rule admits clients to the gRPC ingress port {GRPC_PORT_NAME!r}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Cross-file consistency: one image, one Ray version


def normalize_name(name: str) -> str:
    """PEP 503 normalisation: `Foo_Bar.baz` -> `foo-bar-baz`."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclasses.dataclass(frozen=True)
class Requirement:
    name: str  # normalised
    extras: frozenset[str]
    specifier: str  # e.g. "==2.60.0" or ">=2.60,<2.61" ("" if none)


def parse_requirement(text: str) -> Requirement:
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;#]*?)\s*(?:;.*)?", text)
    if not match:
        raise ValueError(f"cannot parse requirement {text!r}")
    extras = frozenset(normalize_name(e) for e in (match.group(2) or "").split(",") if e.strip())
    return Requirement(normalize_name(match.group(1)), extras, match.group(3).replace(" ", ""))


def read_requirements(path: Path) -> dict[str, Requirement]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = parse_requirement(line)
            out[req.name] = req
    return out


def pinned_version(req: Requirement) -> str | None:
    return req.specifier[2:] if req.specifier.startswith("==") else None


def project_metadata(repo_root: Path = REPO_ROOT) -> Doc:
    return tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def reference_errors(manifests: dict[str, list[Doc]]) -> list[str]:
    """Every PersistentVolumeClaim and Secret a pod template uses is defined by some manifest in k8s/."""
    defined = {(doc.get("kind"), (doc.get("metadata") or {}).get("name")) for docs in manifests.values()
               for doc in docs}
    errors = []
    for name, docs in manifests.items():
        for doc in docs:
            for where, template in pod_templates(doc):
                spec = template.get("spec") or {}
                for volume in spec.get("volumes") or []:
                    claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                    if claim and ("PersistentVolumeClaim", claim) not in defined:
                        errors.append(f"{name} {describe(doc)} {where}: PersistentVolumeClaim {claim!r} is defined "
                                      "by no manifest in k8s/")
                for container in spec.get("containers") or []:
                    for env in container.get("env") or []:
                        ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                        if ref and ("Secret", ref.get("name")) not in defined:
                            errors.append(f"{name} {describe(doc)} {where}: Secret {ref.get('name')!r} is defined "
                                          "by no manifest in k8s/")
    return errors


def consistency_errors(manifests: dict[str, list[Doc]], repo_root: Path = REPO_ROOT) -> list[str]:
    """All Ray pods run `<registry>/logitfusion:<project version>`; rayVersion = the ray pin; references resolve."""
    version = project_metadata(repo_root)["version"]
    ray_pin = pinned_version(read_requirements(repo_root / "requirements.txt")["ray"])
    errors = reference_errors(manifests)
    for name, docs in manifests.items():
        for doc in docs:
            cluster = ray_cluster_spec(doc)
            if cluster is None:
                continue
            if str(cluster.get("rayVersion")) != ray_pin:
                errors.append(f"{name} {describe(doc)}: rayVersion {cluster.get('rayVersion')!r} != ray pin {ray_pin}")
            for where, template in pod_templates(doc):
                image = str(ray_container(template).get("image", ""))
                repo, _, tag = image.rpartition(":")
                if not repo.endswith("/logitfusion") or tag != version:
                    errors.append(f"{name} {describe(doc)} {where}: image {image!r} is not .../logitfusion:{version}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# The image recipe


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs: the recipe uses none)."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by docker too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    if buffer:
        raise ValueError(f"Dockerfile ends inside a continued instruction starting on line {start}")
    return instructions


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def expand(text: str, variables: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


@dataclasses.dataclass(frozen=True)
class PipInstall:
    line: int
    requirement_files: tuple[str, ...]
    requirements: tuple[str, ...]  # specs as written, "." for the project
    options: frozenset[str]


def pip_installs(instructions: list[Instruction]) -> list[PipInstall]:
    """Every `pip install` inside RUN instructions, in order."""
    out = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", ins.args):
            words = shlex.split(command)
            if not {"pip", "pip3"} & {Path(w).name for w in words} or "install" not in words:
                continue
            rest = words[words.index("install") + 1 :]
            files, specs, options = [], [], set()
            index = 0
            while index < len(rest):
                word = rest[index]
                if word in ("-r", "--requirement"):
                    files.append(rest[index + 1])
                    index += 2
                    continue
                if word.startswith("-"):
                    options.add(word.split("=", 1)[0])
                    if word in ("-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f"):
                        index += 1
                elif word:
                    specs.append(word)
                index += 1
            out.append(PipInstall(ins.line, tuple(files), tuple(specs), frozenset(options)))
    return out


def copies(instructions: list[Instruction]) -> list[tuple[int, list[str], str]]:
    """(line, sources, destination) of every COPY/ADD, flags dropped."""
    out = []
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD"):
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            out.append((ins.line, words[:-1], words[-1]))
    return out


def _copied_before(copy_list: list[tuple[int, list[str], str]], source: str, line: int) -> bool:
    norm = source.rstrip("/")
    return any(line_c < line and norm in [s.rstrip("/") for s in sources] for line_c, sources, _ in copy_list)


def dockerfile_errors(dockerfile: Path, repo_root: Path = REPO_ROOT) -> list[str]:
    """The image installs the pinned requirements, every pyproject dependency, and the project; copies configs."""
    instructions = parse_dockerfile(dockerfile.read_text(encoding="utf-8"))
    variables = dockerfile_args(instructions)
    requirements = read_requirements(repo_root / "requirements.txt")
    installs = pip_installs(instructions)
    copy_list = copies(instructions)
    errors = []

    froms = [expand(i.args, variables).split()[0] for i in instructions if i.keyword == "FROM"]
    ray_pin = pinned_version(requirements["ray"])
    if not froms or not re.match(rf"rayproject/ray:{re.escape(str(ray_pin))}-py311", froms[-1]):
        errors.append(f"FROM {froms[-1] if froms else None!r}: expected a rayproject/ray:{ray_pin}-py311* base "
                      "(the Ray and Python the project pins)")

    installed: dict[str, Requirement] = {}
    for install in installs:
        for file in install.requirement_files:
            if not _copied_before(copy_list, file, install.line):
                errors.append(f"line {install.line}: installs -r {file} before COPYing it")
            if Path(file).name == "requirements.txt":
                installed.update(requirements)
        for spec in install.requirements:
            if spec == ".":
                continue
            req = parse_requirement(spec)
            pin = requirements.get(req.name)
            if pin is None:
                errors.append(f"line {install.line}: installs {spec!r}, which requirements.txt does not pin")
            elif req.specifier != pin.specifier:
                errors.append(f"line {install.line}: installs {spec!r} but requirements.txt pins {pin.specifier}")
            installed.setdefault(req.name, req)
            if req.name == "deepspeed" and "--no-build-isolation" not in install.options:
                errors.append(f"line {install.line}: deepspeed must be installed with --no-build-isolation "
                              "(its build imports torch)")
    if not any(Path(f).name == "requirements.txt" for i in installs for f in i.requirement_files):
        errors.append("requirements.txt is never installed with pip install -r")

    torch_line = next((i.line for i in installs if any(parse_requirement(s).name == "torch" for s in i.requirements
                                                        if s != ".")), None)
    ds_line = next((i.line for i in installs if any(parse_requirement(s).name == "deepspeed"
                                                     for s in i.requirements if s != ".")), None)
    if ds_line is not None and (torch_line is None or torch_line > ds_line):
        errors.append("torch must be installed before deepspeed (deepspeed's build imports torch)")

    for dep in project_metadata(repo_root)["dependencies"]:
        req = parse_requirement(dep)
        got = installed.get(req.name)
        if got is None:
            errors.append(f"pyproject dependency {dep!r} is not installed by the Dockerfile")
            continue
        missing = req.extras - got.extras
        if missing:
            errors.append(f"pyproject dependency {dep!r}: the image installs {req.name} without extras "
                          f"{sorted(missing)}")
        version = pinned_version(got)
        if version is not None and req.specifier and not version_satisfies(version, req.specifier):
            errors.append(f"pyproject dependency {dep!r}: the pinned {version} does not satisfy {req.specifier}")

    project = [i for i in installs if "." in i.requirements]
    if not project:
        errors.append("the project itself is never installed (`pip install .`)")
    for install in project:
        for needed in ("pyproject.toml", "logitfusion"):
            if not _copied_before(copy_list, needed, install.line):
                errors.append(f"line {install.line}: `pip install .` runs before {needed} is copied")

    if not any(dest.rstrip("/") == IMAGE_CONFIG_DIR and "k8s/configs" in [s.rstrip("/") for s in sources]
               for _, sources, dest in copy_list):
        errors.append(f"k8s/configs/ is not copied to {IMAGE_CONFIG_DIR}/")
    for line, sources, _ in copy_list:
        for source in sources:
            if not (repo_root / source).exists():
                errors.append(f"line {line}: COPY source {source!r} does not exist in the repository")
    return errors


def version_satisfies(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)


# ---------------------------------------------------------------------------------------------------------------
# Everything


SERVING_TOPOLOGY = f"{IMAGE_CONFIG_DIR}/serve.yaml"  # what a standalone RayCluster must be able to host ...
EVALUATION = f"{IMAGE_CONFIG_DIR}/eval.yaml"  # ... and run


def semantic_errors(docs: list[Doc], k8s_dir: Path = K8S_DIR, check_imports: bool = True) -> list[str]:
    """All non-schema checks of the documents of one manifest file."""
    errors = gcs_ft_errors(docs)
    for doc in docs:
        if doc.get("kind") in CRD_KINDS:
            errors += pod_hygiene_errors(doc)
        if doc.get("kind") == "RayService":
            errors += rayservice_errors(doc, k8s_dir, check_imports)
        elif doc.get("kind") == "RayJob":
            errors += rayjob_errors(doc, k8s_dir, check_imports)
        elif doc.get("kind") == "RayCluster":
            errors += raycluster_errors(doc, SERVING_TOPOLOGY, EVALUATION, k8s_dir)
    return errors


def check_all(k8s_dir: Path = K8S_DIR, schemas: Path | None = None) -> dict[str, list[str]]:
    """file name -> problems, for every manifest and the Dockerfile."""
    schemas = schemas or schema_dir()
    results: dict[str, list[str]] = {}
    loaded: dict[str, list[Doc]] = {}
    for path in manifest_paths(k8s_dir):
        docs = load_manifest(path)
        loaded[path.name] = docs
        errors = []
        for doc in docs:
            if schemas is None and doc.get("kind") in CRD_KINDS:
                errors.append(f"{describe(doc)}: CRD schemas not found (set {SCHEMAS_ENV} or pass --schemas)")
            else:
                errors += document_errors(doc, schemas)  # type: ignore[arg-type]  # only CRDs need schemas
        try:
            errors += semantic_errors(docs, k8s_dir)
        except (ValueError, KeyError, TypeError, IndexError) as error:  # a malformed value the schema also reports
            errors.append(f"semantic checks stopped at a malformed value: {type(error).__name__}: {error}")
        results[path.name] = errors
    results["(consistency)"] = consistency_errors(loaded, k8s_dir.parent)
    results["(network policies)"] = network_policy_errors(loaded)
    results["Dockerfile"] = dockerfile_errors(k8s_dir / "Dockerfile", k8s_dir.parent)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", type=Path, default=None, help=f"CRD schema folder (default ${SCHEMAS_ENV} or "
                        "../shared/k8s-schemas)")
    options = parser.parse_args(argv)
    results = check_all(K8S_DIR, options.schemas)
    problems = 0
    for name, errors in results.items():
        for error in errors:
            print(f"{name}: {error}")
        problems += len(errors)
        if not errors:
            print(f"{name}: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
