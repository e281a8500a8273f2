"""The topology of a deployment: one typed config tree. YAML is only its serialisation.

A topology names the models of one fusion pipeline (their roles, where their weights are, what each worker needs),
the recipe presets the deployment serves, the limits every request must respect and how the service is exposed.
The same file drives the embedded local service, `ray job submit` evaluations and the KubeRay manifests.

    topo = load_topology("configs/zoo.yaml")
    topo.recipe("dlf_capital")                      # -> fusion.Recipe
    topo.resolve_recipe("proxy_capital", {"alphas": [0.5]})
    topo.bundles(num_gpus_available=0)              # placement group bundles of one pipeline

Every field has a one-line doc and a unit in its name where it has one; every cross-field check names the field to
change and quotes the values. Per-request recipe overrides go through the very same checks as the presets.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from logitfusion.actors.tls import WorkerTLS
from logitfusion.errors import ConfigError, InvalidRequest
from logitfusion.fusion.methods import (
    FIELDS,
    INNER_METHODS,
    MAX_ALPHA_LIMIT,
    MAX_BETA,
    METHODS,
    RULES,
    SOLVERS,
    SOLVING_OFF,
    Choice,
    takers,
)
from logitfusion.limits import Limits
from logitfusion.limits import StrictModel as _Strict
from logitfusion.models import zoo
from logitfusion.models.zoo import tasks as zt

if TYPE_CHECKING:
    from logitfusion.fusion import Recipe

Role = Literal["large", "small", "expert", "large_ft"]
Method = Literal[METHODS]  # type: ignore[valid-type]  # the rows of fusion.methods.RULES
Inner = Literal[INNER_METHODS]  # type: ignore[valid-type]
Solver = Literal[SOLVERS]  # type: ignore[valid-type]
Dtype = Literal["float32", "bfloat16", "float16"]

ZOO_PREFIX = "zoo:"  # a model path "zoo:<name>" is the committed zoo model of that name
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
MAX_ROUTE_EXAMPLE_CHARS = 2000
_NEEDS = {"model": "a model name", "interp_lambda": "interp_lambda in [0, 1]"}  # what a required field must hold


class ModelSpec(_Strict):
    """One model of the pipeline and what its worker needs."""

    name: str = Field(pattern=NAME_PATTERN, description="name used by recipes, logs and Describe")
    role: Role = Field(description="large | small | expert | large_ft")
    path: str = Field(min_length=1, description="HF model dir; relative to the YAML's dir; 'zoo:<name>' for the zoo")
    dtype: Dtype = Field("float32", description="dtype the weights are loaded in")
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel shards (one actor and one bundle each)")
    num_cpus: float = Field(0.25, gt=0, le=256, description="CPUs reserved per shard")
    num_gpus: float | None = Field(None, ge=0, le=8, description="GPUs per shard; unset: 1 if the cluster has GPUs")
    max_restarts: int = Field(3, ge=0, le=1000, description="times Ray restarts a dead worker before giving up")
    driver_num_cpus: float = Field(
        0.5, gt=0, le=64, description="CPUs of the actor that drives a tensor-parallel group (tp_size > 1 only)"
    )
    route_examples: tuple[str, ...] = Field(
        (),
        max_length=64,
        description="experts: example prompts of the expert's task, for routed recipes; 'zoo:<task>' stands for 8 "
        "training prompts of that zoo task",
    )

    @model_validator(mode="after")
    def _examples(self) -> ModelSpec:
        if self.route_examples and self.role != "expert":
            raise ValueError(f"route_examples: only experts are routed to, {self.name!r} has role {self.role!r}")
        for i, text in enumerate(self.route_examples):
            if not text.strip() or len(text) > MAX_ROUTE_EXAMPLE_CHARS:
                raise ValueError(f"route_examples[{i}]: must be non-empty and at most {MAX_ROUTE_EXAMPLE_CHARS} chars")
            if text.startswith(ZOO_PREFIX):
                if text[len(ZOO_PREFIX) :] not in zt.task_names():
                    raise ValueError(
                        f"route_examples[{i}]: {text!r} names no zoo task; zoo tasks: {', '.join(zt.task_names())}"
                    )
        return self


class RecipeSpec(_Strict):
    """A recipe preset as data: a method and its parameters. Built into a fusion.Recipe by Topology.recipe()."""

    method: Method = Field(description="recipe family (see fusion.proto RecipeSelection.method)")
    model: str | None = Field(None, description="the model of 'single', or the large_ft model of 'eft_down'")
    experts: tuple[str, ...] = Field((), description="expert model names of the delta terms")
    alphas: tuple[float, ...] = Field((), description="fixed weight per expert (static methods)")
    beta: float | None = Field(None, ge=0, le=MAX_BETA, description="EFT amplification of (large - small)")
    interp_lambda: float | None = Field(None, ge=0, le=1, description="lambda_interp weight of the first expert")
    solver: Solver | None = Field(None, description="DLF solver; method dlf, or routed with inner dlf (default newton)")
    inner: Inner | None = Field(None, description="routed: how the routed experts are fused, dlf (default) or static")
    tau: float | None = Field(None, gt=0, le=10, description="routed: softmax temperature over similarities (0.05)")
    top_k: int | None = Field(None, ge=0, le=64, description="routed: experts kept per request, 0 = all (default 1)")
    min_similarity: float | None = Field(
        None, ge=-1, le=1, description="routed: best similarity below this routes to none, the large base alone (0.5)"
    )
    max_alpha: float = Field(2.0, gt=0, le=MAX_ALPHA_LIMIT, description="upper bound of every alpha")
    description: str = Field("", max_length=200, description="one line for humans (ListRecipes)")

    @model_validator(mode="after")
    def _shape(self) -> RecipeSpec:
        """The method's row of fusion.methods.RULES: its expert count, the parameters it takes and needs."""
        rule = RULES[self.method]
        lo, hi = rule.experts
        n = len(self.experts)
        if not lo <= n <= hi:
            want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
            raise ValueError(f"experts: method {self.method!r} takes {want} experts, got {n} ({list(self.experts)})")
        if len(set(self.experts)) != n:
            raise ValueError(f"experts: each expert may appear once, got {list(self.experts)}")
        for field in FIELDS:
            if getattr(self, field) in (None, ()) or rule.takes(field, self.inner):
                continue
            by_inner = rule.inner and field in ("alphas", "solver")  # routed: its inner method decides these two
            with_inner = f" with inner {self.inner or rule.inner[0]!r}" if by_inner else ""
            raise ValueError(f"{field}: {takers(field)}, not {self.method!r}{with_inner}")
        for field in FIELDS:
            if rule.needs(field) and getattr(self, field) is None:
                raise ValueError(f"{field}: method {self.method!r} needs {_NEEDS[field]}")
        if self.alphas:
            if len(self.alphas) != n:
                raise ValueError(f"alphas: one per expert: got {len(self.alphas)} alphas for {n} experts")
            for i, a in enumerate(self.alphas):
                if not 0.0 <= a <= self.max_alpha:
                    raise ValueError(f"alphas[{i}]: {a} is outside [0, max_alpha={self.max_alpha}]")
        if self.top_k is not None and self.top_k > n:
            raise ValueError(f"top_k: {self.top_k} exceeds the {n} experts (0 keeps every expert)")
        return self

    def merged(self, overrides: dict[str, Any]) -> RecipeSpec:
        """This spec with the given fields replaced (validated again): THE override mechanism of presets.

        A different method starts from scratch. Otherwise the preset's values the new choice cannot take are
        dropped: its alphas when the experts change (they belonged to the old experts), its solver or alphas when
        a routed recipe switches its inner method.
        """
        if "method" in overrides and overrides["method"] != self.method:
            return RecipeSpec.model_validate(overrides)
        base = self.model_dump(exclude={"description"})
        if "experts" in overrides and "alphas" not in overrides:
            base.pop("alphas")
        rule, inner = RULES[self.method], overrides.get("inner", self.inner)
        if inner in INNER_METHODS:  # an unknown inner is refused by name below, with the preset's fields kept
            base = {k: v for k, v in base.items() if k not in FIELDS or rule.takes(k, inner)}
        return RecipeSpec.model_validate({**base, **overrides})

    def choice(self, large: str | None, small: str | None, examples: tuple = ()) -> Choice:
        """This spec's parameters for fusion.methods (the roles' model names and the routed examples added)."""
        return Choice(large=large, small=small, examples=examples, **self.model_dump(include=set(FIELDS)))


class WorkerTLSSpec(_Strict):
    """TLS on the coordinator-to-worker gRPC streams (actors.tls). PEM files; relative paths against base_dir. Every
    Ray node that runs a worker or a coordinator must have them at the same path (k8s: a Secret mounted on each pod)."""

    cert_file: str = Field(min_length=1, description="certificate chain every worker serves (PEM)")
    key_file: str = Field(min_length=1, description="its private key (PEM)")
    ca_file: str = Field(min_length=1, description="CA the coordinator trusts for worker certificates (and, with "
                         "mutual TLS, the workers for the coordinator's)")
    client_cert_file: str | None = Field(None, min_length=1, description="mutual TLS: the coordinator's certificate")
    client_key_file: str | None = Field(None, min_length=1, description="mutual TLS: its private key")
    server_name: str = Field("logitfusion-worker", min_length=1, description="DNS name in the worker certificate's "
                             "subjectAltName that the coordinator verifies (workers are dialled by IP)")

    @model_validator(mode="after")
    def _pair(self) -> WorkerTLSSpec:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError(
                f"serve.worker_tls: client_cert_file ({self.client_cert_file!r}) and client_key_file "
                f"({self.client_key_file!r}) go together (mutual TLS): set both or neither"
            )
        return self


class ServeSpec(_Strict):
    """How the service is exposed."""

    host: str = Field("127.0.0.1", min_length=1, description="address the embedded Ray node binds and clients use")
    grpc_port: int = Field(9000, ge=1, le=65535, description="port of Ray Serve's gRPC ingress")
    http_port: int = Field(8000, ge=1, le=65535, description="port of Ray Serve's HTTP ingress (OpenAI-style API)")
    replicas: int = Field(1, ge=1, le=256, description="pipelines (each: coordinator + its workers)")
    app_name: str = Field("logitfusion", pattern=NAME_PATTERN, description="Ray Serve application name")
    coordinator_num_cpus: float = Field(0.5, gt=0, le=64, description="CPUs of the replica running the coordinator")
    startup_timeout_s: float = Field(600.0, gt=0, le=7200, description="longest wait for every worker to load")
    reconnect_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="how long a runner waits for a dead worker's restart before failing requests"
    )
    stall_timeout_s: float = Field(
        2.0, gt=0, le=3600, description="a worker that has not answered a step within this long is left behind: the "
        "requests that read it wait (and end at their deadline), the others go on"
    )
    worker_bind_host: str = Field(
        "node", min_length=1, description="where workers listen: 'node' (the node's Ray IP), 127.0.0.1, or an IP"
    )
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD"] = Field(
        "PACK", description="placement group strategy of one pipeline (PACK: one node when it fits, else several)"
    )
    auth_token_env: str | None = Field(
        None, pattern=r"^[A-Z_][A-Z0-9_]*$", description="env var holding a bearer token clients must send; unset: none"
    )
    coordinator_num_gpus: float | None = Field(
        None, ge=0, le=1, description="GPU share of the coordinator's replica, for fusion; unset: 0.1 when the "
        "cluster has GPUs, else 0"
    )
    fusion_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the coordinator fuses and solves DLF; auto: its GPU share when it has one"
    )
    worker_tls: WorkerTLSSpec | None = Field(
        None, description="TLS (optionally mutual) on the coordinator-to-worker streams; unset: plaintext, for "
        "pipelines inside one trusted network"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="on SIGTERM/SIGINT: how long requests in flight may still run before they "
        "are cancelled (UNAVAILABLE naming this field); new requests are refused from the signal on"
    )


class Topology(_Strict):
    """One fusion pipeline: models, presets, limits, serving."""

    models: tuple[ModelSpec, ...] = Field(min_length=1, description="every model of the pipeline")
    presets: dict[str, RecipeSpec] = Field(min_length=1, description="recipe presets by name")
    default_preset: str = Field(description="preset used when a request names none")
    limits: Limits = Field(default_factory=Limits, description="per-request limits")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="how the service is exposed")
    base_dir: str = Field(".", description="directory relative model paths resolve against (the YAML's dir)")

    @field_validator("presets")
    @classmethod
    def _preset_names(cls, v: dict[str, RecipeSpec]) -> dict[str, RecipeSpec]:
        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"preset name {name!r} must match {NAME_PATTERN}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Topology:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: names must be unique, repeated: {dupes}")
        for role in ("large", "small"):
            holders = [m.name for m in self.models if m.role == role]
            if len(holders) > 1:
                raise ValueError(f"models: at most one model may have role {role!r}, got {holders}")
        if self.default_preset not in self.presets:
            raise ValueError(
                f"default_preset: {self.default_preset!r} is not a preset; presets are {sorted(self.presets)}"
            )
        for name, spec in self.presets.items():
            check_recipe_models(spec, self.models, f"presets.{name}")
        return self

    # ---- queries -------------------------------------------------------------------------------------------------

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def role_model(self, role: Role) -> str | None:
        """The name of the (only) model with this role, or None."""
        return next((m.name for m in self.models if m.role == role), None)

    def model_path(self, name: str) -> Path:
        """Where model `name`'s weights are: zoo names resolved, relative paths against base_dir."""
        return resolve_model_path(self.model(name).path, Path(self.base_dir))

    def worker_tls(self) -> WorkerTLS | None:
        """serve.worker_tls with its paths resolved against base_dir (None: plaintext streams)."""
        spec = self.serve.worker_tls
        if spec is None:
            return None
        def resolve(p: str | None) -> str | None:
            return None if p is None else str(Path(self.base_dir, Path(p).expanduser()))

        return WorkerTLS(cert_file=resolve(spec.cert_file), key_file=resolve(spec.key_file),
                         ca_file=resolve(spec.ca_file), client_cert_file=resolve(spec.client_cert_file),
                         client_key_file=resolve(spec.client_key_file), server_name=spec.server_name)

    def recipe(self, preset: str) -> Recipe:
        """Preset name -> fusion.Recipe."""
        if preset not in self.presets:
            raise InvalidRequest(
                f"recipe.preset: unknown preset {preset!r}; this deployment serves {sorted(self.presets)}",
                field="recipe.preset",
            )
        return build_recipe(self.presets[preset], self, name=preset)

    def resolve_recipe(self, preset: str | None, overrides: dict[str, Any] | None = None) -> tuple[str, Recipe]:
        """A request's recipe: the named (or default) preset with per-request overrides applied and checked.

        Returns (name, recipe): the preset name when nothing was overridden, else "custom".
        Raises InvalidRequest naming the field ("recipe.<field>") and the limit.
        """
        name = preset or self.default_preset
        if name not in self.presets:
            raise InvalidRequest(
                f"recipe.preset: unknown preset {name!r}; this deployment serves {sorted(self.presets)}",
                field="recipe.preset",
            )
        if not overrides:
            return name, self.recipe(name)
        overrides = dict(overrides)
        if overrides.get("solver") == SOLVING_OFF:
            _solving_off(overrides, self.presets[name])
        try:
            spec = self.presets[name].merged(overrides)
        except ValidationError as e:
            raise InvalidRequest(format_validation_error(e, "recipe"), field="recipe") from None
        try:
            check_recipe_models(spec, self.models, "recipe")
        except ValueError as e:
            raise InvalidRequest(str(e), field="recipe") from None
        return "custom", build_recipe(spec, self, name="custom")

    def total_shards(self) -> int:
        """Model shards of one pipeline (a tensor-parallel model counts tp_size)."""
        return sum(m.tp_size for m in self.models)

    def coordinator_gpus(self, num_gpus_available: float) -> float:
        """The coordinator replica's GPU share (fusion runs there): serve.coordinator_num_gpus if set; else 0.1 of
        a GPU (fusion is a few [B, V] passes) when that fits beside the shards: a spare GPU (at least one more GPU
        than shards), or GPUs the shards share anyway (fewer GPUs than shards); else 0 (every GPU is one shard's
        whole: the coordinator fuses on its CPU)."""
        if self.serve.coordinator_num_gpus is not None:
            return self.serve.coordinator_num_gpus
        shards = self.total_shards()
        if num_gpus_available <= 0 or shards <= num_gpus_available < shards + 1:
            return 0.0
        return COORDINATOR_GPU_SHARE

    def model_shard_gpus(self, name: str, num_gpus_available: float) -> float:
        """GPUs of each shard of model ``name``, from what is left once the coordinator has its share."""
        pool = max(0.0, num_gpus_available - self.coordinator_gpus(num_gpus_available))
        return shard_gpus(self.model(name), pool, self.total_shards())

    def placement_bundles(self, num_gpus_available: float) -> list[dict[str, float]]:
        """The placement group of one pipeline (one Serve replica): the coordinator's CPU bundle first, then one
        bundle per model in topology order. A tensor-parallel model's bundle holds only the actor that drives its
        group; the shards get a STRICT_PACK group of their own (actors.tp), so every shard of one model shares a
        node even when the pipeline spans several."""
        coord = self.coordinator_gpus(num_gpus_available)
        out = [{"CPU": self.serve.coordinator_num_cpus, **({"GPU": coord} if coord else {})}]
        for m in self.models:
            if m.tp_size > 1:
                out.append({"CPU": m.driver_num_cpus})
                continue
            gpus = self.model_shard_gpus(m.name, num_gpus_available)
            out.append({"CPU": m.num_cpus, **({"GPU": gpus} if gpus else {})})
        return out

    def shard_bundles(self, name: str, num_gpus_available: float) -> list[dict[str, float]]:
        """The shard bundles of tensor-parallel model ``name`` (empty for tp_size 1)."""
        m = self.model(name)
        if m.tp_size == 1:
            return []
        gpus = self.model_shard_gpus(name, num_gpus_available)
        return [{"CPU": m.num_cpus, **({"GPU": gpus} if gpus else {})} for _ in range(m.tp_size)]

    def bundles(self, num_gpus_available: float) -> list[dict[str, float]]:
        """Every bundle one pipeline reserves (its placement group, then each tensor-parallel group's shards):
        the capacity one replica needs."""
        out = self.placement_bundles(num_gpus_available)
        for m in self.models:
            out.extend(self.shard_bundles(m.name, num_gpus_available))
        return out

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude={"base_dir"}, exclude_defaults=False)
        return yaml.safe_dump(data, sort_keys=False)


COORDINATOR_GPU_SHARE = 0.1


def shard_gpus(model: ModelSpec, num_gpus_available: float, total_shards: int = 1) -> float:
    """GPUs per shard of ``model``: its own setting; else one GPU when the cluster has one for each of the
    pipeline's ``total_shards``; else an equal share of the GPUs there are (several small models on one GPU);
    else none."""
    if model.num_gpus is not None:
        return model.num_gpus
    if num_gpus_available >= total_shards:
        return 1.0
    if num_gpus_available > 0:
        return math.floor(100 * num_gpus_available / total_shards) / 100  # 1 GPU, 3 shards -> 0.33 each
    return 0.0


def check_recipe_models(spec: RecipeSpec, models: tuple[ModelSpec, ...], where: str) -> None:
    """Every model the spec names exists with the right role. Raises ValueError naming `where.<field>`."""
    roles = {m.name: m.role for m in models}
    have = {r: [m.name for m in models if m.role == r] for r in ("large", "small", "expert", "large_ft")}
    examples = {m.name: m.route_examples for m in models}
    for i, e in enumerate(spec.experts):
        if e not in roles:
            raise ValueError(f"{where}.experts[{i}]: unknown expert {e!r}; experts served here: {have['expert']}")
        if roles[e] != "expert":
            raise ValueError(f"{where}.experts[{i}]: {e!r} has role {roles[e]!r}, not 'expert'")
        if RULES[spec.method].route_examples and not examples[e]:
            routable = [m for m in have["expert"] if examples[m]]
            raise ValueError(
                f"{where}.experts[{i}]: {e!r} has no route_examples, so it cannot be routed to; "
                f"experts with examples: {routable}"
            )
    if spec.model is not None:
        if spec.model not in roles:
            raise ValueError(f"{where}.model: unknown model {spec.model!r}; models served here: {sorted(roles)}")
        want = RULES[spec.method].model_role
        if want not in (None, "any") and roles[spec.model] != want:
            raise ValueError(
                f"{where}.model: {spec.method} needs a {want} model, {spec.model!r} is {roles[spec.model]!r}"
            )
    for role in RULES[spec.method].reads:
        if not have[role]:
            raise ValueError(f"{where}.method: {spec.method!r} needs a model with role {role!r}; none is configured")


def _solving_off(overrides: dict[str, Any], preset: RecipeSpec) -> None:
    """A request's solver "static" (fusion.proto RecipeSelection.solver) is no solver: it turns solving off. It
    stands for what the method's row says (solving_off): method static over the same experts, or, for routed, inner
    static. Rewritten here, once, so RecipeSpec.solver only ever holds a real solver."""
    del overrides["solver"]
    field, value = RULES[overrides.get("method", preset.method)].solving_off
    overrides.setdefault(field, value)
    if field == "method":
        overrides.setdefault("experts", preset.experts)


def build_recipe(spec: RecipeSpec, topo: Topology, name: str) -> Recipe:
    """RecipeSpec -> fusion.Recipe: the constructor of the method's row (which validates it), named after the
    preset."""
    rule = RULES[spec.method]
    examples = tuple(route_example_ids(topo, e) for e in spec.experts) if rule.route_examples else ()
    recipe = rule.build(spec.choice(topo.role_model("large"), topo.role_model("small"), examples))
    return recipe.named(name)


def route_example_ids(topo: Topology, expert: str) -> tuple[tuple[int, ...], ...]:
    """An expert's route_examples as token ids of the small base's tokenizer ('zoo:<task>' expanded)."""
    texts: list[str] = []
    for text in topo.model(expert).route_examples:
        if text.startswith(ZOO_PREFIX):
            texts += zt.route_example_prompts(text[len(ZOO_PREFIX) :])
        else:
            texts.append(text)
    small = topo.role_model("small")
    return _encode_examples(str(topo.model_path(small)), tuple(texts))  # type: ignore[arg-type]


@lru_cache(maxsize=256)
def _encode_examples(tokenizer_dir: str, texts: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(t) for t in _tokenizer(tokenizer_dir).encode(text)) for text in texts)


@lru_cache(maxsize=8)
def _tokenizer(tokenizer_dir: str) -> Any:
    """The small base's tokenizer (every model of a pipeline shares it), loaded once per process."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"route_examples: cannot load the small base's tokenizer from {tokenizer_dir}: {exc}") from None


def resolve_model_path(path: str, base_dir: Path) -> Path:
    """'zoo:<name>' -> the zoo's directory for that model; a relative path -> against base_dir; absolute kept."""
    if path.startswith(ZOO_PREFIX):
        name = path[len(ZOO_PREFIX) :]
        try:
            return Path(zoo.load_zoo().model(name))
        except zoo.ZooNotBuilt as exc:
            raise ConfigError(f"path {path!r}: the zoo is not built ({exc}); run `logitfusion zoo build`") from None
        except KeyError as exc:
            raise ConfigError(f"path {path!r}: {exc.args[0]}") from None
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()


def format_validation_error(err: ValidationError, prefix: str) -> str:
    """pydantic's multi-line report -> one line per problem: '<prefix>.<field>: <message> (got <value>)'."""
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in (prefix, *e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("value_error", "missing") else f" (got {e.get('input')!r})"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


def parse_topology(data: Any, base_dir: Path | str = ".") -> Topology:
    """A mapping (parsed YAML) -> Topology. Raises ConfigError with one line per problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"topology: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Topology.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "topology")) from None


def load_topology(path: str | Path) -> Topology:
    """Read and check a topology YAML file. Relative model paths resolve against the file's directory."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"topology: cannot read {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"topology: {p} is not valid YAML: {e}") from None
    return parse_topology(data, p.resolve().parent)
