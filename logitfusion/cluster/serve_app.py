"""The Ray Serve application: FusionService and grpc.health.v1 behind Serve's native gRPC ingress, and the
OpenAI-compatible HTTP API with /metrics behind Serve's HTTP proxy (cluster.http_app), on the same pipeline.

One Serve replica = one fusion pipeline: the replica process runs the Coordinator (the Decoder over RemoteRunners)
in the first bundle of its placement group; each model gets a ModelWorker actor in a bundle of its own (started by
cluster.launch, which also sizes the replica's group). A client's request enters through Serve's gRPC proxy and
reaches a replica method named like the rpc; from there on the per-token loop is the Coordinator's own gRPC streams
to the workers, never Serve.

    build_app({"config": "configs/zoo.yaml"})       # the bound application (k8s: serve_app:build_app)
    cluster.cli.run_service(config, ...)            # `logitfusion serve --config FILE`: embedded local Ray

Edge rule: protobuf types live at the edge only: here (the ingress registration, the size check of each message)
and in cluster.convert, whose ``request_from_pb`` checks every field against the topology's limits (messages name
the field and the limit) and builds the engine's GenerationRequest; ``chunk_to_pb`` and friends go back. Every
error becomes a status through errors.to_status (the one mapping).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import ray
import torch
from grpc_health.v1 import health_pb2
from ray import serve

from logitfusion.cluster.convert import (
    chunk_to_pb,
    describe_to_pb,
    recipes_to_pb,
    request_from_pb,
    response_from_chunks,
)
from logitfusion.cluster.http_app import HttpFrontend, build_http_app
from logitfusion.cluster.launch import Pipeline, deployment_options, load_tokenizer
from logitfusion.cluster.topology import Limits, Topology, load_topology
from logitfusion.errors import (
    ConfigError,
    FusionError,
    InvalidRequest,
    MessageTooLarge,
    NotFound,
    ShuttingDown,
    Unauthenticated,
    classify,
    to_status,
)
from logitfusion.metrics import ServiceMetrics
from logitfusion.v1 import fusion_pb2 as pb

if TYPE_CHECKING:
    from logitfusion.actors.coordinator import Coordinator

logger = logging.getLogger(__name__)

SERVICE_NAME = "logitfusion.v1.FusionService"
DEPLOYMENT_NAME = "FusionService"
SERVICER_FUNCTIONS = (
    "logitfusion.cluster.serve_app.add_fusion_service_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
# The generated servicer function works too; ours (also the one k8s/rayservice.yaml names) differs in one thing only:
# bytes that do not parse as a GenerateRequest get INVALID_ARGUMENT naming the message, instead of gRPC's UNKNOWN.
GENERATED_SERVICER_FUNCTION = "logitfusion.v1.fusion_pb2_grpc.add_FusionServiceServicer_to_server"
DRAIN_RETRY_AFTER_S = 5.0  # the retry pushback a request refused while draining carries


# ------------------------------------------------------------------------------------------------ gRPC ingress


@dataclass(frozen=True)
class Undecodable:
    """What the ingress hands the replica when the request bytes do not parse (never a crash in the proxy)."""

    method: str
    num_bytes: int
    reason: str


def _tolerant(parse, method: str):
    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError (and friends) on garbage
            return Undecodable(method, len(data), str(exc) or type(exc).__name__)

    return deserialize


def report_replica_death_as_unavailable() -> bool:
    """Make Serve's gRPC proxy (this process) answer UNAVAILABLE, not INTERNAL, for a call whose replica died.

    Ray 2.60's proxy maps every RayActorError to INTERNAL ("The actor died unexpectedly ..."): for a client that is
    the server going away mid-call, which gRPC calls UNAVAILABLE (retryable), and the replica is restarted by Serve.
    The proxy overrides our handlers (only the request deserializer is ours), so the mapping is wrapped where the
    proxy looks it up, once per process; anything not an actor death keeps Serve's status. Returns whether the
    wrapper is installed (False, with a warning, on a Ray whose proxy does not have the function).
    """
    try:
        from ray.exceptions import RayActorError
        from ray.serve._private import proxy as serve_proxy
    except ImportError:
        return False
    original = getattr(serve_proxy, "get_grpc_response_status", None)
    if original is None:
        logger.warning("this Ray's Serve proxy has no get_grpc_response_status: a dead replica stays INTERNAL")
        return False
    if getattr(original, "_logitfusion", False):
        return True

    def status(exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        out = original(exc, *args, **kwargs)
        if getattr(out, "code", None) == grpc.StatusCode.INTERNAL and isinstance(exc, RayActorError):
            first = (str(exc).strip().splitlines() or ["actor died"])[0][:200]
            message = f"the replica serving this call died; Serve restarts it: retry ({first})"
            return dataclasses.replace(out, code=grpc.StatusCode.UNAVAILABLE, message=message)
        return out

    status._logitfusion = True  # type: ignore[attr-defined]
    serve_proxy.get_grpc_response_status = status
    return True


def add_fusion_service_to_server(servicer: Any, server: Any) -> None:
    """Register FusionService like the generated add_FusionServiceServicer_to_server, but with request parsing
    that turns undecodable bytes into an ``Undecodable`` value (answered with INVALID_ARGUMENT by the replica).
    Serve calls it in its proxy process, which is where report_replica_death_as_unavailable() takes effect."""
    from logitfusion.v1 import fusion_pb2_grpc

    messages = {
        "Generate": (pb.GenerateRequest, pb.GenerateResponse, grpc.unary_unary_rpc_method_handler),
        "GenerateStream": (pb.GenerateRequest, pb.GenerateStreamResponse, grpc.unary_stream_rpc_method_handler),
        "ListRecipes": (pb.ListRecipesRequest, pb.ListRecipesResponse, grpc.unary_unary_rpc_method_handler),
        "Describe": (pb.DescribeDeploymentRequest, pb.DescribeDeploymentResponse, grpc.unary_unary_rpc_method_handler),
    }
    handlers = {
        name: make(
            getattr(servicer, name),
            request_deserializer=_tolerant(req.FromString, name),
            response_serializer=resp.SerializeToString,
        )
        for name, (req, resp, make) in messages.items()
    }
    report_replica_death_as_unavailable()
    generic = grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers((generic,))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE_NAME, handlers)
    del fusion_pb2_grpc  # imported only to fail loudly here if the generated code is missing


def check_message(msg: Any, limits: Limits) -> None:
    """Refuse undecodable and oversized request messages."""
    if isinstance(msg, Undecodable):
        raise InvalidRequest(
            f"request: {msg.num_bytes} bytes are not a valid message for {SERVICE_NAME}/{msg.method}: {msg.reason}",
            field="request",
        )
    size = msg.ByteSize()
    if size > limits.max_message_bytes:
        raise MessageTooLarge(
            f"request: {size} bytes exceed the limit max_message_bytes ({limits.max_message_bytes})", field="request"
        )


# ------------------------------------------------------------------------------------------------ the frontend


class FusionFrontend:
    """FusionService's logic over one Coordinator, independent of the transport (Serve replica or a plain server).

    Methods raise FusionError (or ValueError) on failure; the transport maps them with errors.to_status.
    """

    def __init__(self, topology: Topology, coordinator: Coordinator) -> None:
        self.topology = topology
        self.coordinator = coordinator
        infos = coordinator.models()
        self.vocab_size = next(iter(infos.values())).vocab_size
        self._describe = describe_to_pb(topology, infos, coordinator.codec.eos_token_ids)
        self._recipes = pb.ListRecipesResponse(
            recipes=recipes_to_pb(topology), default_preset=topology.default_preset
        )
        self.serving = True
        self.draining = False  # set once by begin_drain(): health NOT_SERVING, new requests ShuttingDown
        token_env = topology.serve.auth_token_env
        self._token = os.environ.get(token_env, "") if token_env else ""
        if token_env and not self._token:
            raise ConfigError(f"serve.auth_token_env: environment variable {token_env} is unset or empty")

    def authenticate(self, metadata: Sequence[tuple[str, Any]]) -> None:
        """Refuse a call without the bearer token, when the deployment requires one."""
        if not self._token:
            return
        given = next((str(v) for k, v in metadata if k.lower() == "authorization"), "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            raise Unauthenticated("metadata authorization: missing or wrong bearer token")

    def begin_drain(self) -> None:
        """From now on: health reports NOT_SERVING and every new request gets ShuttingDown (UNAVAILABLE, retry)."""
        self.draining = True

    def check_admitting(self) -> None:
        """Raise ShuttingDown once draining (both ingresses, gRPC and HTTP, call it before admitting a request)."""
        if self.draining:
            raise ShuttingDown(
                f"the server is shutting down and admits no new request; retry in {DRAIN_RETRY_AFTER_S:g} s "
                "(another replica, or this service once it is back)",
                retry_after_s=DRAIN_RETRY_AFTER_S,
            )

    def _submit(self, msg: Any, request_id: str | None) -> tuple[str, Any]:
        """Check and convert the request, then admit it; returns (recipe name, its stream)."""
        self.check_admitting()
        check_message(msg, self.topology.limits)
        rid = msg.request_id or request_id or self.coordinator.new_request_id()
        req = request_from_pb(
            msg, topology=self.topology, codec=self.coordinator.codec, vocab_size=self.vocab_size, request_id=rid
        )
        return req.recipe.name, self.coordinator.submit(req)

    async def generate_stream(self, msg: Any, request_id: str | None = None) -> AsyncIterator[Any]:
        """GenerateStream: one message per step. Aborts the request (frees its sequences) if the caller goes away."""
        _, stream = self._submit(msg, request_id)
        try:
            async for chunk in stream:
                yield chunk_to_pb(chunk)
        finally:
            if not stream.ended:
                self.coordinator.abort(stream.request_id)

    async def generate(self, msg: Any, request_id: str | None = None) -> Any:
        recipe, stream = self._submit(msg, request_id)
        chunks = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
        finally:
            if not stream.ended:
                self.coordinator.abort(stream.request_id)
        return response_from_chunks(chunks, recipe)

    def list_recipes(self) -> Any:
        return self._recipes

    def describe(self) -> Any:
        return self._describe

    def health(self, service: str) -> Any:
        if service not in ("", SERVICE_NAME):
            raise NotFound(f"service: unknown service {service!r}; this server reports '' and {SERVICE_NAME!r}")
        ok = self.serving and not self.draining and self.coordinator.alive()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


# ------------------------------------------------------------------------------------------------ the deployment


def _apply_error(grpc_context: Any, exc: BaseException) -> FusionError:
    """Set the status on Serve's gRPC context; return the exception to raise (Serve keeps our code and details)."""
    code, details = to_status(exc)
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(details)
    return classify(exc)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()  # the HTTP app is built per replica, after __init__, by __serve_build_asgi_app__
class FusionDeployment:
    """One replica = one pipeline. Methods are named like the rpcs; Serve's gRPC proxy routes to them. HTTP requests
    go to the Starlette app of cluster.http_app over the same Coordinator, limits and token."""

    def __init__(self, topology: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.topology = Topology.model_validate(topology)
        ctx = serve.get_replica_context()
        prefix = f"lf-{ctx.app_name}-{ctx.replica_id.unique_id}"
        self._replica_id = ctx.replica_id.unique_id
        self._drain_task: asyncio.Future | None = None
        t0 = time.monotonic()
        self.pipeline = Pipeline.launch(self.topology, name_prefix=prefix)
        self.frontend = FusionFrontend(self.topology, self.pipeline.coordinator)
        self.metrics, self.http = http_frontend(self.topology, self.pipeline.coordinator, self.frontend, prefix)
        logger.info("pipeline %s ready in %.1f s: models %s", prefix, time.monotonic() - t0,
                    [m.name for m in self.topology.models])

    # FusionService ------------------------------------------------------------------------------------------

    def __serve_build_asgi_app__(self) -> Any:  # noqa: N807 - Serve's hook name
        return build_http_app(self.http)

    async def Generate(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802 - rpc name
        status = "ok"
        try:
            self.frontend.authenticate(grpc_context.invocation_metadata() if grpc_context else ())
            return await self.frontend.generate(request, self._request_id(grpc_context))
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a status
            err = _apply_error(grpc_context, exc)
            status = err.code.name.lower()
            raise err from None
        finally:
            self.metrics.request_done(_preset_of(request, self.topology.default_preset), status, "grpc")

    async def GenerateStream(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        status = "ok"
        try:
            self.frontend.authenticate(grpc_context.invocation_metadata() if grpc_context else ())
            async for msg in self.frontend.generate_stream(request, self._request_id(grpc_context)):
                yield msg
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except BaseException as exc:  # noqa: BLE001
            err = _apply_error(grpc_context, exc)
            status = err.code.name.lower()
            raise err from None
        finally:
            self.metrics.request_done(_preset_of(request, self.topology.default_preset), status, "grpc")

    async def ListRecipes(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            check_message(request, self.topology.limits)
            self.frontend.authenticate(grpc_context.invocation_metadata() if grpc_context else ())
            return self.frontend.list_recipes()
        except BaseException as exc:  # noqa: BLE001
            raise _apply_error(grpc_context, exc) from None

    async def Describe(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            check_message(request, self.topology.limits)
            self.frontend.authenticate(grpc_context.invocation_metadata() if grpc_context else ())
            return self.frontend.describe()
        except BaseException as exc:  # noqa: BLE001
            raise _apply_error(grpc_context, exc) from None

    # grpc.health.v1 -----------------------------------------------------------------------------------------

    async def Check(self, request: Any, grpc_context: Any = None) -> Any:  # noqa: N802
        try:
            return self.frontend.health(request.service)
        except BaseException as exc:  # noqa: BLE001
            raise _apply_error(grpc_context, exc) from None

    async def Watch(self, request: Any, grpc_context: Any = None) -> AsyncIterator[Any]:  # noqa: N802
        """The current status, then every change (polled each second) until the client goes away."""
        try:
            last = None
            while True:
                now = self.frontend.health(request.service)
                if now.status != last:
                    last = now.status
                    yield now
                await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001
            raise _apply_error(grpc_context, exc) from None

    # Serve hooks and introspection (DeploymentHandle only, not exposed over gRPC) ------------------------------

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (Serve replaces it)."""
        if not self.pipeline.coordinator.alive():
            raise RuntimeError("the coordinator loop is not running")

    def workers(self) -> dict[str, tuple[str, str]]:
        """Model name -> (Ray actor name, namespace) of its ModelWorker (tests and operators reach them by it)."""
        namespace = ray.get_runtime_context().namespace
        return {model: (name, namespace) for model, name in self.pipeline.worker_names.items()}

    async def stats(self) -> dict[str, Any]:
        """Coordinator counters (decoding steps run, requests running), this replica's pid, and the live sequences
        on each model worker as the worker itself counts them (its own table; all 0 when nothing leaks)."""
        c = self.pipeline.coordinator
        models = list(self.pipeline.workers)
        tables = await asyncio.gather(*(self.pipeline.workers[m].sequences.remote() for m in models),
                                      return_exceptions=True)
        live = {m: (len(t) if isinstance(t, dict) else f"unreachable: {type(t).__name__}")
                for m, t in zip(models, tables, strict=True)}
        return {"steps_run": c.steps_run, "active_requests": c.active_requests(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "live_sequences": live}

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Graceful shutdown of this replica's pipeline, called by `logitfusion serve` on SIGTERM/SIGINT.

        At once: health NOT_SERVING and new requests ShuttingDown. Then requests in flight run on for up to
        ``timeout_s`` (serve.drain_timeout_s); any still running are cancelled with ShuttingDown naming that field.
        Returns {"replica", "finished", "cancelled"} once nothing runs. A second call (another caller, or the same
        one retrying) waits for the same drain: calls on a draining replica stay open, so a handle that routes
        to the least busy replica reaches every replica in turn.
        """
        if self._drain_task is None:
            self.frontend.begin_drain()
            self._drain_task = asyncio.ensure_future(self._drain(timeout_s))
        return await asyncio.shield(self._drain_task)

    async def _drain(self, timeout_s: float) -> dict[str, Any]:
        c = self.pipeline.coordinator
        running = c.active_requests()
        logger.info("draining: %d request(s) in flight, up to serve.drain_timeout_s=%g s", len(running), timeout_s)
        cancelled: list[str] = []
        if not await asyncio.to_thread(c.wait_idle, timeout_s):
            cancelled = c.abort_all(
                ShuttingDown(
                    f"the request was cancelled: the server is shutting down and the request was still running "
                    f"when serve.drain_timeout_s ({timeout_s:g} s) passed; retry it",
                    retry_after_s=DRAIN_RETRY_AFTER_S,
                )
            )
            logger.warning("drain: cancelled %d request(s) after %g s: %s", len(cancelled), timeout_s, cancelled)
            await asyncio.to_thread(c.wait_idle, 30.0)
        finished = len(set(running) - set(cancelled))
        return {"replica": self._replica_id, "finished": finished, "cancelled": len(cancelled)}

    async def __del__(self) -> None:  # async: Serve's ingress wrapper awaits only a coroutine __del__
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            self.frontend.serving = False
            pipeline.close()

    @staticmethod
    def _request_id(grpc_context: Any) -> str | None:
        return grpc_context.request_id() if grpc_context is not None else None


def http_frontend(topology: Topology, coordinator: Coordinator, frontend: FusionFrontend, name: str) -> tuple:
    """The pipeline's metrics (also the coordinator's observer) and the HTTP frontend over the same coordinator."""
    metrics = ServiceMetrics(name, coordinator, presets=list(topology.presets))
    coordinator.observer = metrics
    tokenizer = load_tokenizer(topology.model_path(topology.models[0].name))
    return metrics, HttpFrontend(topology, coordinator, frontend, tokenizer, metrics)


def _preset_of(msg: Any, default: str) -> str | None:
    """The preset a gRPC request named (``default`` when none); None for an undecodable message."""
    if isinstance(msg, Undecodable) or not hasattr(msg, "recipe"):
        return None
    return msg.recipe.preset or default


def build_app(args: Mapping[str, Any]) -> Any:
    """The application builder (``logitfusion.cluster.serve_app:build_app``): args {"config": "<topology yaml>"}."""
    path = args.get("config") if isinstance(args, Mapping) else None
    if not path:
        raise ConfigError('build_app: args must be {"config": "<topology yaml path>"}')
    topology = load_topology(path)
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    data = topology.model_dump(mode="json")
    return FusionDeployment.options(**deployment_options(topology, gpus)).bind(data)
