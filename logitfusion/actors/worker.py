"""The model worker: one ModelRunner served over worker.proto, and the Ray actor that hosts it.

``WorkerServer`` is plain gRPC (testable without Ray): it serves the ``Step`` stream, ``Describe``, ``Sequences`` and
the standard health service over any ModelRunner. ``ModelWorker`` is the Ray actor: it builds the runner from a
``WorkerSpec`` and starts a WorkerServer; a coordinator asks it for ``address()`` and then talks gRPC only
(``actors.remote.RemoteRunner``), because a bidirectional stream costs a fraction of a Ray actor call per step.

Per stream the server keeps the stream's sequences apart from every other stream's: a client seq_id ``s`` lives in
the runner as ``"<stream_id>/s"``. When a stream ends (the client half-closed it, cancelled it, or died) every
sequence of that stream is released, so a vanished coordinator leaks no KV cache.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from logitfusion import wire
from logitfusion.actors import shm
from logitfusion.actors.tls import WorkerTLS
from logitfusion.engine.runner import ExtendOp, ModelRunner, RunnerError, RunnerInfo, RunnerUnavailable, StepPlan
from logitfusion.v1 import worker_pb2 as pb
from logitfusion.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # gRPC's default of 4 MiB holds only ~30 rows of a 32k vocabulary
STREAM_ID_METADATA_KEY = "lf-stream-id"
HEALTH_SERVICE_NAME = "logitfusion.v1.Worker"
_STREAM_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# framing of a StepResponse around its logits bytes: fixed fields, plus a varint row count per extend (generous)
_RESPONSE_OVERHEAD_BYTES = 64
_RESPONSE_BYTES_PER_EXTEND = 6


def grpc_channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options both ends use: raised message limits, and keepalive so a dead peer is noticed on an idle stream."""
    if not 0 < max_message_bytes < 2**31:
        raise ValueError(f"max_message_bytes={max_message_bytes} must be in 1..{2**31 - 1} (gRPC's int32 limit)")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # server: accept the clients' keepalives
    ]


# ------------------------------------------------------------------------------------------------ pure helpers


def scope_plan(plan: StepPlan, prefix: str) -> StepPlan:
    """The plan with every seq_id prefixed by its stream's scope."""
    return StepPlan(
        extends=tuple(ExtendOp(prefix + e.seq_id, e.token_ids, e.want, e.features_tokens) for e in plan.extends),
        truncates=tuple((prefix + s, n) for s, n in plan.truncates),
        releases=tuple(prefix + s for s in plan.releases),
    )


def check_response_size(plan: StepPlan, vocab_size: int, dtype: torch.dtype, max_message_bytes: int) -> None:
    """Refuse, before anything runs, a step whose logits would not fit in one message."""
    rows = sum(plan.rows_per_extend())
    framing = _RESPONSE_OVERHEAD_BYTES + _RESPONSE_BYTES_PER_EXTEND * len(plan.extends)
    need = rows * vocab_size * dtype.itemsize + framing
    if need > max_message_bytes:
        raise _TooLarge(
            f"StepRequest.extends: the logits of {rows} rows x {vocab_size} columns of "
            f"{str(dtype).removeprefix('torch.')} need about {need} bytes, over the worker's "
            f"max_message_bytes={max_message_bytes}; ask for fewer want_all rows per step or bfloat16 logits"
        )


class _TooLarge(ValueError):
    """A step's response would exceed the message limit."""


# ------------------------------------------------------------------------------------------------- the server


@dataclass
class _Stream:
    """One open Step stream."""

    stream_id: str
    prefix: str  # "<stream_id>/": the runner-side scope of this stream's seq ids
    lengths: dict[str, int] = field(default_factory=dict)  # scoped seq id -> cached tokens, as this stream's
    # successful steps left them (no runner call per step; re-read from the runner only after a failed step)
    closed: bool = False
    ring: shm.Ring | None = None  # the stream's shared-memory slots, made on its first shared_memory request


class _WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """worker.proto over one runner. Runner calls are serialised: one step at a time, from any stream."""

    def __init__(self, runner: ModelRunner, max_message_bytes: int, max_streams: int) -> None:
        self._runner = runner
        self._info = runner.describe()
        self._max_message_bytes = max_message_bytes
        self._max_streams = max_streams
        self._runner_lock = threading.Lock()  # one plan at a time; also orders cleanup against steps
        self._streams_lock = threading.Condition()
        self._streams: dict[str, _Stream] = {}
        self.steps_served = 0
        self.shared_steps = 0  # steps whose logits went back in shared memory
        self.shm_identity = self._shared_memory()

    def _shared_memory(self) -> str:
        """The identity of the shared directory logits may go through (actors/shm.py), "" where it is off."""
        ident = shm.identity()
        if ident:
            swept = shm.sweep_stale()
            if swept:
                logger.info("worker %s: removed %d shared-memory files of dead processes", self._info.name, swept)
        return ident

    # ------------------------------------------------------------------------------------------- streams

    def _open_stream(self, context: grpc.ServicerContext) -> _Stream:
        metadata = dict(context.invocation_metadata() or ())
        stream_id = metadata.get(STREAM_ID_METADATA_KEY) or uuid.uuid4().hex
        if not _STREAM_ID_PATTERN.fullmatch(stream_id):
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata {STREAM_ID_METADATA_KEY}: {stream_id[:80]!r} must match {_STREAM_ID_PATTERN.pattern}",
            )
        with self._streams_lock:
            if stream_id in self._streams:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"stream {stream_id!r} is already open on this worker")
            if len(self._streams) >= self._max_streams:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{len(self._streams)} Step streams already open, the worker's max_streams={self._max_streams}",
                )
            stream = _Stream(stream_id=stream_id, prefix=f"{stream_id}/")
            self._streams[stream_id] = stream
        logger.info("worker %s: stream %s opened", self._info.name, stream_id)
        return stream

    def _close_stream(self, stream: _Stream) -> None:
        """Release every sequence of the stream. Idempotent (runs from the handler and from the RPC callback)."""
        with self._streams_lock:
            if stream.closed:
                return
            stream.closed = True
        leftover: list[str] = []
        try:
            with self._runner_lock:
                scoped = set(stream.lengths) | {s for s in self._runner.sequences() if s.startswith(stream.prefix)}
                leftover = sorted(scoped)
                if leftover:
                    self._runner.submit(StepPlan(releases=tuple(leftover))).result()
        except Exception:  # noqa: BLE001 - a closed runner has nothing left to release; never kill the server
            logger.warning("worker %s: releasing stream %s failed", self._info.name, stream.stream_id, exc_info=True)
        with self._streams_lock:
            ring, stream.ring = stream.ring, None  # stream.closed is set: no step makes a new one
            self._streams.pop(stream.stream_id, None)
            self._streams_lock.notify_all()
        if ring is not None:
            ring.close()  # a step still writing into it gets an error and answers in the message
        logger.info("worker %s: stream %s closed, released %d sequences", self._info.name, stream.stream_id,
                    len(leftover))

    def active_streams(self) -> list[str]:
        with self._streams_lock:
            return sorted(self._streams)

    def wait_streams(self, at_most: int, timeout_s: float) -> bool:
        """Block until at most ``at_most`` streams are open (every ended stream's sequences released); False on
        timeout."""
        with self._streams_lock:
            return self._streams_lock.wait_for(lambda: len(self._streams) <= at_most, timeout=timeout_s)

    # ------------------------------------------------------------------------------------------- rpcs

    def Step(self, request_iterator: Iterator[pb.StepRequest], context: grpc.ServicerContext):
        stream = self._open_stream(context)
        context.add_callback(lambda: self._close_stream(stream))  # cancellation may never resume this generator
        try:
            for request in request_iterator:
                yield self._step(stream, request)
        finally:
            self._close_stream(stream)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.RunnerInfo:
        msg = wire.info_to_proto(self._info, pid=os.getpid())
        if self.shm_identity:
            msg.shm_dir, msg.shm_identity = str(shm.SHM_DIR), self.shm_identity
        return msg

    def Sequences(self, request: pb.SequencesRequest, context: grpc.ServicerContext) -> pb.SequencesResponse:
        live = self._runner.sequences()
        if request.stream_id:
            prefix = f"{request.stream_id}/"
            live = {s[len(prefix) :]: n for s, n in live.items() if s.startswith(prefix)}
        return pb.SequencesResponse(
            sequences=[pb.SequenceLength(seq_id=s, length_tokens=n) for s, n in sorted(live.items())]
        )

    # ------------------------------------------------------------------------------------------- one step

    def _stream_lengths(self, prefix: str) -> dict[str, int]:
        return {s: n for s, n in self._runner.sequences().items() if s.startswith(prefix)}

    def _step(self, stream: _Stream, request: pb.StepRequest) -> pb.StepResponse:
        step_id = request.step_id
        vocab = self._info.vocab_size
        shared = request.shared_memory and bool(self.shm_identity)  # then the logits are not in the message
        try:
            plan, dtype = wire.request_to_plan(request)
            wire.check_plan_limits(plan, vocab)
            # in shared memory too: the limit also bounds the memory one response may take
            check_response_size(plan, vocab, dtype, self._max_message_bytes)
        except _TooLarge as exc:
            return wire.error_response(step_id, pb.StepError.CODE_RESOURCE_EXHAUSTED, str(exc))
        except wire.WireError as exc:
            return wire.error_response(step_id, pb.StepError.CODE_INVALID_ARGUMENT, str(exc))
        if plan.is_empty():  # nothing for the model to do (a ping, or a step in which this model has no ops)
            return wire.logits_response(step_id, [], dtype, vocab)
        scoped = scope_plan(plan, stream.prefix)
        with self._runner_lock:
            try:
                logits = self._runner.submit(scoped).result()
                lengths = scoped.apply(stream.lengths, self._info.name)  # what the runner now holds
            except Exception as exc:  # noqa: BLE001 - every failure becomes a response; the stream stays open
                actual = self._stream_lengths(stream.prefix)
                # a RunnerError should refuse a plan before anything changes; check, and trust nothing else
                changed = not isinstance(exc, RunnerError) or actual != stream.lengths
                stream.lengths = actual
                return self._failure(stream, step_id, exc, changed)
            stream.lengths = lengths
        self.steps_served += 1
        try:
            # encoding runs outside the runner lock; entries past the extends are feature vectors
            ring = self._ring(stream) if shared else None
            response = wire.logits_response(step_id, logits, dtype, vocab, n_extends=len(plan.extends),
                                            shared=ring.write if ring is not None else None)
            self.shared_steps += bool(response.logits.shared_memory_path)
            return response
        except Exception as exc:  # noqa: BLE001 - a runner answered the wrong shape: the step ran, its logits are lost
            return self._failure(stream, step_id, exc, changed=True)

    def _ring(self, stream: _Stream) -> shm.Ring | None:
        """The stream's shared-memory slots, made on first use; None once the stream is closing (a ring made then
        would outlive it)."""
        with self._streams_lock:
            if stream.ring is None and not stream.closed:
                stream.ring = shm.Ring(stream.stream_id)
            return stream.ring

    def _failure(self, stream: _Stream, step_id: int, exc: Exception, changed: bool) -> pb.StepResponse:
        message = str(exc).replace(stream.prefix, "")  # the client knows its seq ids without our scope
        if isinstance(exc, RunnerUnavailable):
            code = pb.StepError.CODE_UNAVAILABLE
        elif isinstance(exc, RunnerError):
            code = pb.StepError.CODE_INVALID_ARGUMENT
        else:
            code = pb.StepError.CODE_INTERNAL
            logger.error("worker %s: step %d of stream %s failed", self._info.name, step_id, stream.stream_id,
                         exc_info=exc)
            message = f"{type(exc).__name__}: {message}"
        return wire.error_response(step_id, code, message, sequences_changed=changed)


class WorkerServer:
    """A gRPC server (thread pool) serving worker.proto over ``runner``. Binds ``host:port`` (port 0: any free);
    with ``tls`` (actors.tls) it speaks only TLS (mutual TLS: it accepts only clients with a certificate)."""

    def __init__(
        self,
        runner: ModelRunner,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_streams: int = 16,
        tls: WorkerTLS | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams={max_streams} must be >= 1")
        options = grpc_channel_options(max_message_bytes)
        self.runner = runner
        self.host = host
        self.servicer = _WorkerServicer(runner, max_message_bytes, max_streams)
        # one thread per open stream, plus room for Describe/Sequences/health while every stream is busy
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_streams + 4, thread_name_prefix="worker-rpc"),
            options=options,
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        bound = (self._server.add_secure_port(f"{host}:{port}", tls.server_credentials()) if tls
                 else self._server.add_insecure_port(f"{host}:{port}"))
        self.tls = tls
        if bound == 0:
            raise OSError(f"worker server could not bind {host}:{port}")
        self.port = bound
        self._server.start()
        for service in ("", HEALTH_SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._stopped = False
        logger.info("worker %s serving on %s", runner.describe().name, self.address)

    @property
    def address(self) -> str:
        """``host:port`` as a client dials it."""
        return f"{self.host}:{self.port}"

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no stream is open and every ended stream has released its sequences; False on timeout."""
        return self.servicer.wait_streams(0, timeout_s)

    def wait_streams(self, at_most: int, timeout_s: float) -> bool:
        """Block until at most ``at_most`` streams are open; False on timeout."""
        return self.servicer.wait_streams(at_most, timeout_s)

    def stop(self, grace: float | None = 1.0, *, wait_s: float = 10.0) -> bool:
        """Stop serving: health turns NOT_SERVING, new RPCs are refused, open streams are cancelled after ``grace``
        seconds (their sequences released). Waits at most ``wait_s`` for running handlers (a handler stuck inside
        the runner cannot be interrupted); returns whether shutdown completed. Idempotent; the runner stays open
        (its owner closes it)."""
        if self._stopped:
            return True
        self._stopped = True
        self._health.enter_graceful_shutdown()
        done = self._server.stop(grace).wait(timeout=wait_s)
        if not done:
            logger.warning("worker server %s: handlers still running %.1f s after stop", self.address, wait_s)
        return done


# ------------------------------------------------------------------------------------------------- the Ray actor


@dataclass(frozen=True)
class WorkerSpec:
    """What one ModelWorker serves and how it is reached."""

    name: str  # the model's name in the topology (RunnerInfo.name)
    model_path: str | None = None  # a local HF directory or .gguf file (models.loading); None needs `factory`
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16 | float16
    device: str = "auto"  # "auto": cuda when this actor was given a GPU and CUDA works, else cpu; or "cpu"/"cuda"
    tp_size: int = 1  # > 1: the model is sharded over tp_size TPShard actors (actors.tp); this actor drives them
    max_length_tokens: int | None = None  # default: the model's own limit
    gguf_file: str | None = None  # a GGUF file inside model_path
    bind_host: str = "127.0.0.1"  # "127.0.0.1" (one machine, tests), "node" (this node's IP: multi-node), or an IP
    port: int = 0  # 0: any free port (a restarted actor gets a new one; clients re-ask address())
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # gRPC send/receive limit of the worker server
    max_streams: int = 16  # concurrent Step streams (coordinators) the worker accepts
    tls: WorkerTLS | None = None  # serve over TLS (the files are read on the worker's node)
    factory: Callable[[], ModelRunner] | None = field(default=None, compare=False)  # builds the runner instead
    # of loading model_path (random-weight models for tests and benchmarks); must be picklable (a module-level
    # function or a functools.partial of one)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("WorkerSpec.name must be a non-empty string")
        if self.model_path is None and self.factory is None:
            raise ValueError(f"WorkerSpec {self.name!r}: set model_path or factory")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"WorkerSpec.device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if not 1 <= self.tp_size <= 64:
            raise ValueError(f"WorkerSpec.tp_size={self.tp_size} must be in 1..64")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"WorkerSpec.port={self.port} must be in 0..65535")
        grpc_channel_options(self.max_message_bytes)  # validates the limit


def resolve_device(requested: str, gpu_ids: list[Any]) -> str:
    """The torch device for a spec's ``device``: "auto" is cuda only when a GPU was assigned and CUDA works."""
    if requested == "auto":
        return "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
    return requested


def resolve_bind_host(bind_host: str, node_ip: Callable[[], str]) -> tuple[str, str]:
    """(address to bind, address clients dial) for a spec's ``bind_host``."""
    if bind_host == "node":
        ip = node_ip()
        return ip, ip
    if bind_host in ("0.0.0.0", "::", "[::]"):
        return bind_host, node_ip()
    return bind_host, bind_host


def build_runner(spec: WorkerSpec, device: str) -> ModelRunner:
    """The runner a worker serves: from the spec's factory, a tensor-parallel group, or one local model."""
    if spec.factory is not None:
        return spec.factory()
    if spec.tp_size > 1:
        # Hook for a large model over several GPUs: the shards are their own Ray actors (STRICT_PACK placement
        # group made by TensorParallelRunner); this worker only drives rank 0's plan fan-out and gathers logits.
        from logitfusion.actors.tp import TensorParallelRunner, TPConfig

        return TensorParallelRunner(
            TPConfig(
                model_dir=str(spec.model_path),
                name=spec.name,
                tp_size=spec.tp_size,
                dtype=spec.dtype,
                device=spec.device,  # type: ignore[arg-type]
                max_length_tokens=spec.max_length_tokens,
            )
        )
    from logitfusion.engine.local import LocalRunner

    # threaded=False: the server's stream thread runs the forward itself (one thread hop less per step)
    return LocalRunner.from_pretrained(
        str(spec.model_path),
        spec.name,
        dtype=spec.dtype,
        device=device,
        gguf_file=spec.gguf_file,
        max_length_tokens=spec.max_length_tokens,
        threaded=False,
    )


class ModelWorker:
    """A Ray actor serving one model over worker.proto. Create it with ``start_worker`` (or ``ray.remote``).

    The actor's methods are for set-up and inspection only; the per-step traffic goes over gRPC to ``address()``.
    Ray restarts a crashed worker (max_restarts); the new incarnation reloads the model and serves on a new port.
    """

    def __init__(self, spec: WorkerSpec) -> None:
        torch.set_num_threads(1)
        import ray

        self._spec = spec
        in_ray = ray.is_initialized()
        gpu_ids = ray.get_gpu_ids() if in_ray else []
        device = resolve_device(spec.device, gpu_ids)
        self._runner = build_runner(spec, device)
        bind, advertised = resolve_bind_host(spec.bind_host, ray.util.get_node_ip_address)
        self._server = WorkerServer(
            self._runner,
            host=bind,
            port=spec.port,
            max_message_bytes=spec.max_message_bytes,
            max_streams=spec.max_streams,
            tls=spec.tls,
        )
        self._address = f"{advertised}:{self._server.port}"
        logger.info("ModelWorker %s (pid %d) on %s serving at %s", spec.name, os.getpid(), device, self._address)

    def address(self) -> str:
        """"host:port" of this incarnation's gRPC server."""
        return self._address

    def describe(self) -> RunnerInfo:
        return self._runner.describe()

    def sequences(self) -> dict[str, int]:
        """Every live sequence on the worker, named "<stream_id>/<seq_id>"."""
        return self._runner.sequences()

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self, grace_s: float = 1.0) -> None:
        """Stop serving and free the model (before ray.kill, for a clean exit)."""
        self._server.stop(grace_s)
        self._runner.close()


def start_worker(
    spec: WorkerSpec,
    *,
    num_cpus: float = 0.25,
    num_gpus: float = 0.0,
    max_restarts: int = -1,
    placement_group: Any = None,
    bundle_index: int = -1,
    name: str | None = None,
    namespace: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> Any:
    """Start a ModelWorker actor and return its handle (needs ray.init). ``max_restarts=-1``: Ray restarts it after
    every crash. ``placement_group``/``bundle_index``: schedule it into a reserved bundle (a pipeline's placement
    group). With ``spec.tp_size > 1`` the shards hold the GPUs, so leave ``num_gpus=0`` for this actor."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # callers retry address() themselves (RemoteRunner does, until its timeout)
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}},
    }
    if placement_group is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index
        )
    if name is not None:
        options["name"] = name
    if namespace is not None:
        options["namespace"] = namespace
    return ray.remote(ModelWorker).options(**options).remote(spec)
