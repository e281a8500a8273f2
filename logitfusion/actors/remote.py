"""RemoteRunner: a ModelRunner whose model lives in a model worker, reached over ONE long-lived gRPC stream.

Each ``submit(plan)`` becomes one StepRequest on the stream; a reader (the supervisor thread) resolves the future
when the StepResponse with the same step_id arrives. The runner keeps, per live sequence, the token history the
worker has acknowledged (updated only when a step succeeds, applying releases, truncates and extends).

When the stream breaks (the worker died, the connection dropped) the pending futures are NOT failed. The supervisor
asks ``address_fn`` again (for an actor-backed runner: the restarted actor's new port), checks that the worker
serves the same model, re-creates every live sequence on a fresh stream by re-sending its history as extends
(discarding the logits), and then re-sends the pending plans: the Decoder only sees a slower step. Only when no
worker could be reached within ``reconnect_timeout_s`` do the pending futures fail with RunnerUnavailable; the
runner then forgets every sequence (the caller re-creates what it still needs, e.g. ``Decoder.resync``) and tries
to reconnect again at the next submit.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc

from logitfusion import wire
from logitfusion.actors import shm
from logitfusion.actors.tls import WorkerTLS
from logitfusion.actors.worker import DEFAULT_MAX_MESSAGE_BYTES, STREAM_ID_METADATA_KEY, grpc_channel_options
from logitfusion.engine.runner import (
    ExtendOp,
    ModelRunner,
    RunnerError,
    RunnerInfo,
    RunnerUnavailable,
    StepPlan,
    failed,
)
from logitfusion.v1 import worker_pb2 as pb
from logitfusion.v1 import worker_pb2_grpc

logger = logging.getLogger(__name__)

# Stream failures that say nothing about the request (the peer went away): reconnect and re-send the pending plans.
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0


# ------------------------------------------------------------------------------------------------- pure helpers


def replay_plans(histories: Mapping[str, list[int]], max_tokens_per_step: int) -> list[StepPlan]:
    """Plans that re-create every sequence from its history, packing whole sequences up to a token budget per step
    (a sequence longer than the budget gets a step of its own)."""
    plans: list[StepPlan] = []
    batch: list[ExtendOp] = []
    tokens = 0
    for seq_id, history in sorted(histories.items()):
        if not history:
            continue  # truncated to 0: the worker holds it empty; an extend will re-create it
        if batch and tokens + len(history) > max_tokens_per_step:
            plans.append(StepPlan(extends=tuple(batch)))
            batch, tokens = [], 0
        batch.append(ExtendOp(seq_id, tuple(history), "last"))
        tokens += len(history)
    if batch:
        plans.append(StepPlan(extends=tuple(batch)))
    return plans


def same_model(expected: RunnerInfo, got: RunnerInfo) -> str | None:
    """None when ``got`` serves the model ``expected`` describes, else what differs."""
    diffs = [
        f"{f}: {getattr(expected, f)!r} -> {getattr(got, f)!r}"
        for f in ("name", "vocab_size", "vocab_fingerprint", "max_length_tokens")
        if getattr(expected, f) != getattr(got, f)
    ]
    return "; ".join(diffs) or None


# ------------------------------------------------------------------------------------------------- connection


class _StreamBroken(Exception):
    """The stream ended without close(): carries the gRPC status code when there was one."""

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(f"{code.name if code else 'EOF'}: {details}")
        self.code = code
        self.details = details


@dataclass
class _Connection:
    """One channel and the Step stream on it."""

    address: str
    channel: grpc.Channel
    stub: worker_pb2_grpc.WorkerStub
    stream_id: str
    requests: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # StepRequest, or None to half-close
    call: Any = None  # the Step call: an iterator of StepResponse, also a grpc.Future (cancel())
    shared: bool = False  # the worker's memory filesystem is this process's: logits may come in shared memory

    def send(self, request: pb.StepRequest, in_flight: Iterable[pb.StepRequest]) -> None:
        """Queue a step request, asking for shared memory when this connection can use it and fewer than the
        worker's ring of slots (shm.SLOTS) are already out: a slot is rewritten only after its logits were read."""
        request.shared_memory = self.shared and sum(r.shared_memory for r in in_flight) < shm.SLOTS
        self.requests.put(request)

    def open_stream(self) -> None:
        def pump() -> Iterator[pb.StepRequest]:
            while (req := self.requests.get()) is not None:
                yield req

        self.call = self.stub.Step(pump(), metadata=((STREAM_ID_METADATA_KEY, self.stream_id),))

    def next_response(self) -> pb.StepResponse:
        try:
            return next(self.call)
        except StopIteration:
            raise _StreamBroken(None, "the worker ended the stream") from None
        except grpc.RpcError as err:
            raise _StreamBroken(err.code(), err.details() or "") from err

    def close(self) -> None:
        self.requests.put(None)
        if self.call is not None:
            self.call.cancel()
        self.channel.close()


@dataclass
class _Pending:
    """A submitted plan whose response has not arrived."""

    plan: StepPlan
    request: pb.StepRequest
    future: Future
    rows: list[int]
    breaks: int = 0  # streams that broke while this plan was in flight


# ------------------------------------------------------------------------------------------------- the runner


class RemoteRunner(ModelRunner):
    """A gRPC client of one model worker (see the module docstring).

    name: the model's name (for messages; checked against the worker's Describe). address_fn: returns the worker's
    current "host:port"; called again after every broken stream, so it may block while a worker restarts and may
    raise while none is reachable (retried until reconnect_timeout_s). logits_dtype: "float32", or "bfloat16" to
    halve traffic (the Decoder still gets fp32 tensors). info: the RunnerInfo to expect; None asks the worker now.
    max_breaks_per_step: a plan whose in-flight stream broke this many times fails with RunnerError (a plan that
    crashes its worker every time must not loop until the timeout). tls: dial the worker over TLS (actors.tls).
    shared_memory: take the logits from the worker's shared memory when it is this process's too (same host and
    memory filesystem: actors/shm.py), instead of in the messages; LOGITFUSION_SHM=0 turns it off everywhere.
    """

    def __init__(
        self,
        name: str,
        address_fn: Callable[[], str],
        *,
        logits_dtype: str = "float32",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        reconnect_timeout_s: float = 60.0,
        call_timeout_s: float = 10.0,
        replay_tokens_per_step: int = 8192,
        max_breaks_per_step: int = 3,
        info: RunnerInfo | None = None,
        tls: WorkerTLS | None = None,
        shared_memory: bool = True,
    ) -> None:
        wire.logits_dtype_code(logits_dtype)  # validates the name
        if reconnect_timeout_s <= 0 or call_timeout_s <= 0:
            raise ValueError(
                f"reconnect_timeout_s={reconnect_timeout_s} and call_timeout_s={call_timeout_s} must be > 0"
            )
        if replay_tokens_per_step < 1 or max_breaks_per_step < 1:
            raise ValueError(
                f"replay_tokens_per_step={replay_tokens_per_step} and max_breaks_per_step={max_breaks_per_step} "
                "must be >= 1"
            )
        self.name = name
        self._address_fn = address_fn
        self._logits_dtype = logits_dtype
        self._max_message_bytes = max_message_bytes
        self._options = grpc_channel_options(max_message_bytes) + (tls.channel_options() if tls else [])
        self._credentials = tls.channel_credentials() if tls else None  # read once: a bad file fails here
        self._reconnect_timeout_s = reconnect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._replay_tokens_per_step = replay_tokens_per_step
        self._max_breaks_per_step = max_breaks_per_step
        self._info = info
        self._shared_memory = shared_memory and shm.enabled()
        self._reader = shm.Reader()
        self._cond = threading.Condition()  # guards everything below
        self._pending: dict[int, _Pending] = {}  # step_id -> plan in flight, in submission order
        self._histories: dict[str, list[int]] = {}  # seq_id -> tokens the worker has acknowledged
        self._conn: _Connection | None = None  # set while the stream is live (replay done)
        self._closed = False
        self._step_ids = itertools.count(1)
        self.reconnects = 0  # streams re-established after a break (for tests and metrics)
        first = self._connect(time.monotonic() + reconnect_timeout_s)  # fails fast if no worker is reachable
        self._supervisor = threading.Thread(
            target=self._supervise, args=(first,), name=f"remote-runner-{name}", daemon=True
        )
        self._supervisor.start()

    @classmethod
    def for_actor(cls, name: str, actor: Any, *, call_timeout_s: float = 10.0, **kwargs: Any) -> RemoteRunner:
        """A RemoteRunner of a ModelWorker actor: the address is asked from the actor, again after every break
        (a restarted actor serves on a new port)."""
        import ray

        def address() -> str:
            return ray.get(actor.address.remote(), timeout=call_timeout_s)

        return cls(name, address, call_timeout_s=call_timeout_s, **kwargs)

    # ------------------------------------------------------------------------------------------------ contract

    def describe(self) -> RunnerInfo:
        info = self._info  # set by the first _connect in __init__
        if info is None:
            raise RunnerUnavailable(f"{self.name}: the worker has not described its model yet")
        return info

    def submit(self, plan: StepPlan) -> Future:
        step_id = next(self._step_ids)
        try:
            request = wire.plan_to_request(plan, step_id, self._logits_dtype)
        except (wire.WireError, TypeError, ValueError) as exc:
            return failed(RunnerError(f"{self.name}: cannot encode the plan: {exc}"))
        size = request.ByteSize()
        if size > self._max_message_bytes:
            return failed(
                RunnerError(
                    f"{self.name}: step request of {size} bytes exceeds max_message_bytes={self._max_message_bytes}"
                )
            )
        future: Future = Future()
        with self._cond:
            if self._closed:
                return failed(RunnerUnavailable(f"{self.name}: the remote runner is closed"))
            if self._conn is not None:
                self._conn.send(request, (p.request for p in self._pending.values()))
            self._pending[step_id] = _Pending(plan, request, future, plan.rows_per_extend())
            self._cond.notify_all()  # wakes a supervisor that gave up and waits for work
        return future

    def sequences(self) -> dict[str, int]:
        """The worker's live sequences of this runner's stream; the acknowledged histories' lengths when the worker
        cannot be asked (the stream is down)."""
        with self._cond:
            conn = self._conn
            local = {s: len(h) for s, h in self._histories.items()}
        if conn is None:
            return local
        try:
            resp = conn.stub.Sequences(pb.SequencesRequest(stream_id=conn.stream_id), timeout=self._call_timeout_s)
        except (grpc.RpcError, ValueError) as err:  # ValueError: the channel was closed meanwhile
            logger.debug("%s: Sequences failed (%s); answering from the local histories", self.name, err)
            return local
        return {s.seq_id: int(s.length_tokens) for s in resp.sequences}

    def history(self, seq_id: str) -> tuple[int, ...]:
        """The tokens of one sequence the worker has acknowledged (what a reconnect replays)."""
        with self._cond:
            return tuple(self._histories.get(seq_id, ()))

    def close(self) -> None:
        """Half-close the stream (the worker releases this stream's sequences), stop the supervisor, fail what is
        still pending. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conn, self._conn = self._conn, None
            self._cond.notify_all()
        if conn is not None:
            conn.requests.put(None)  # the worker sees end-of-stream, releases, then ends its side
        self._supervisor.join(timeout=self._call_timeout_s)
        if conn is not None:
            conn.close()
        self._reader.close()
        self._fail_pending(RunnerUnavailable(f"{self.name}: the remote runner was closed"))

    # ------------------------------------------------------------------------------------------------ connecting

    def _connect(self, deadline: float) -> _Connection:
        """Ask for the address, open a channel, check the model; retried with backoff until ``deadline``."""
        backoff, last = _BACKOFF_FIRST_S, "no attempt"
        while True:
            with self._cond:
                if self._closed:
                    raise RunnerUnavailable(f"{self.name}: the remote runner was closed")
            address = "?"
            try:
                address = self._address_fn()
                channel = (grpc.secure_channel(address, self._credentials, options=self._options) if self._credentials
                           else grpc.insecure_channel(address, options=self._options))
                stub = worker_pb2_grpc.WorkerStub(channel)
                try:
                    remaining = max(0.1, min(self._call_timeout_s, deadline - time.monotonic()))
                    described = stub.Describe(pb.DescribeRequest(), timeout=remaining)
                    info = wire.info_from_proto(described)
                except BaseException:
                    channel.close()
                    raise
                if self._info is None and info.name != self.name:
                    channel.close()
                    raise RunnerUnavailable(
                        f"{self.name}: the worker at {address} serves model {info.name!r}, not {self.name!r}"
                    )
                if self._info is None:
                    self._info = info
                elif (diff := same_model(self._info, info)) is not None:
                    channel.close()
                    raise RunnerUnavailable(f"{self.name}: the worker at {address} serves another model ({diff})")
                shared = self._shared_memory and shm.same_memory(described.shm_dir, described.shm_identity)
                return _Connection(address, channel, stub, stream_id=uuid.uuid4().hex, shared=shared)
            except RunnerUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - address_fn and Describe may fail while a worker restarts
                last = f"{type(exc).__name__}: {exc}"
                logger.debug("%s: connecting to %s failed: %s", self.name, address, last)
            now = time.monotonic()
            if now >= deadline:
                raise RunnerUnavailable(
                    f"{self.name}: no worker reachable within reconnect_timeout_s={self._reconnect_timeout_s} "
                    f"(last address {address}; last error {last})"
                )
            with self._cond:  # a backoff that close() interrupts
                if self._closed:
                    raise RunnerUnavailable(f"{self.name}: the remote runner was closed")
                self._cond.wait(min(backoff, deadline - now))
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _replay(self, conn: _Connection) -> int:
        """Re-create every acknowledged sequence on the fresh stream; returns the tokens re-sent."""
        with self._cond:
            histories = {s: list(h) for s, h in self._histories.items()}
        sent = 0
        for plan in replay_plans(histories, self._replay_tokens_per_step):
            step_id = next(self._step_ids)
            conn.requests.put(wire.plan_to_request(plan, step_id, "bfloat16"))  # logits discarded: the cheap dtype
            resp = conn.next_response()
            if resp.step_id != step_id or resp.WhichOneof("outcome") != "logits":
                why = resp.error.message if resp.WhichOneof("outcome") == "error" else f"step_id {resp.step_id}"
                raise RunnerUnavailable(f"{self.name}: replaying sequences on {conn.address} failed: {why}")
            sent += sum(len(e.token_ids) for e in plan.extends)
        return sent

    # ------------------------------------------------------------------------------------------------ supervisor

    def _supervise(self, first: _Connection) -> None:
        """Connect, replay, re-send, read; after a break start over. Gives up (failing the pending futures) when no
        stream got through its replay within reconnect_timeout_s of the break, then waits for the next submit."""
        conn: _Connection | None = first
        deadline = time.monotonic() + self._reconnect_timeout_s
        backoff = _BACKOFF_FIRST_S
        while True:
            live = False
            try:
                if conn is None:
                    conn = self._connect(deadline)
                    self.reconnects += 1
                conn.open_stream()
                replayed = self._replay(conn)
                with self._cond:
                    if self._closed:
                        conn.close()
                        return
                    sent: list[pb.StepRequest] = []
                    for p in self._pending.values():  # in submission order
                        conn.send(p.request, sent)
                        sent.append(p.request)
                    self._conn = conn
                live = True
                if replayed:
                    logger.info("%s: stream re-established on %s, %d tokens replayed", self.name, conn.address,
                                replayed)
                self._read(conn)  # until the stream ends
                return  # ended by close()
            except _StreamBroken as broken:
                self._on_break(conn, broken)
                conn = None
                now = time.monotonic()
                if live:  # a fresh outage: a full timeout to recover from it
                    deadline, backoff = now + self._reconnect_timeout_s, _BACKOFF_FIRST_S
                elif now >= deadline:
                    if not self._give_up(RunnerUnavailable(
                        f"{self.name}: no stream to the worker survived its replay within "
                        f"reconnect_timeout_s={self._reconnect_timeout_s}: {broken}"
                    )):
                        return
                    deadline = time.monotonic() + self._reconnect_timeout_s
                else:  # broke again before going live: pace the retries
                    if not self._pause(min(backoff, deadline - now)):
                        return
                    backoff = min(backoff * 2, _BACKOFF_MAX_S)
            except RunnerUnavailable as exc:
                if conn is not None:
                    conn.close()
                conn = None
                if not self._give_up(exc):
                    return
                deadline, backoff = time.monotonic() + self._reconnect_timeout_s, _BACKOFF_FIRST_S

    def _give_up(self, exc: RunnerUnavailable) -> bool:
        """Fail every pending future and forget every sequence (RunnerUnavailable means the model's caches are lost:
        a caller that goes on re-sends whole histories, as Decoder.resync does), then wait for the next submit
        (True) or close() (False)."""
        with self._cond:
            if self._closed:
                return False
            lost = len(self._histories)
            self._histories.clear()
        logger.warning("%s: %s; %d sequence(s) forgotten", self.name, exc, lost)
        self._fail_pending(exc)
        with self._cond:
            self._cond.wait_for(lambda: self._closed or bool(self._pending))
            return not self._closed

    def _pause(self, seconds: float) -> bool:
        """A retry pause that close() interrupts; False when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed, timeout=max(0.0, seconds))
            return not self._closed

    def _read(self, conn: _Connection) -> None:
        """Resolve futures from the live stream until it ends (close()) or breaks (_StreamBroken)."""
        while True:
            try:
                resp = conn.next_response()
            except _StreamBroken:
                with self._cond:
                    if self._closed:
                        return
                raise
            self._on_response(conn, resp)

    def _on_response(self, conn: _Connection, resp: pb.StepResponse) -> None:
        with self._cond:
            pending = self._pending.get(resp.step_id)
            if pending is not None and resp.WhichOneof("outcome") == "error":
                del self._pending[resp.step_id]
        if pending is None:
            logger.warning("%s: response for unknown step_id %d ignored", self.name, resp.step_id)
            return
        if resp.WhichOneof("outcome") == "error":
            self._on_step_error(conn, resp.error, pending)
            return
        try:
            with self._cond:
                # the worker has applied it: its stream took the plan by the same rules from the same lengths
                pending.plan.apply_tokens(self._histories, self.name)
            n_features = sum(1 for e in pending.plan.extends if e.features_tokens)
            # Logits in shared memory are copied out while the step still counts as pending, so no request sent
            # meanwhile can make the worker reuse their slot (_Connection.send allows two shared in flight).
            out = wire.split_logits(resp.logits, pending.rows, self.describe().vocab_size, n_features,
                                    shared=self._reader.read)
        except (RunnerError, wire.WireError) as exc:
            self._forget_pending(resp.step_id)
            pending.future.set_exception(RunnerError(f"{self.name}: bad response from {conn.address}: {exc}"))
            return
        self._forget_pending(resp.step_id)
        pending.future.set_result(out)

    def _forget_pending(self, step_id: int) -> None:
        with self._cond:
            self._pending.pop(step_id, None)

    def _on_step_error(self, conn: _Connection, error: pb.StepError, pending: _Pending) -> None:
        code = pb.StepError.Code.Name(error.code).removeprefix("CODE_")
        text = f"{self.name} (worker {conn.address}) refused step: [{code}] {error.message}"
        if error.sequences_changed:
            # the worker may hold half of this plan: re-create every sequence from the histories on a fresh stream
            logger.warning("%s; re-synchronising on a fresh stream", text)
            conn.call.cancel()
        exc_type = RunnerUnavailable if error.code == pb.StepError.CODE_UNAVAILABLE else RunnerError
        pending.future.set_exception(exc_type(text))

    def _on_break(self, conn: _Connection | None, broken: _StreamBroken) -> None:
        """Keep the pending plans for a re-send, except those the break says are at fault or that broke too often."""
        address = conn.address if conn is not None else "?"
        with self._cond:
            self._conn = None
            doomed = []
            for step_id, p in list(self._pending.items()):
                p.breaks += 1
                at_fault = broken.code is not None and broken.code not in _TRANSIENT
                if at_fault or p.breaks >= self._max_breaks_per_step:
                    doomed.append(self._pending.pop(step_id))
        if conn is not None:
            conn.close()
        logger.warning("%s: stream to %s broke (%s); %d pending step(s) kept for a re-send", self.name, address,
                       broken, len(self._pending))
        for p in doomed:
            p.future.set_exception(
                RunnerError(f"{self.name}: the stream to {address} failed on this step {p.breaks} time(s): {broken}")
            )

    def _fail_pending(self, exc: BaseException) -> None:
        with self._cond:
            doomed = list(self._pending.values())
            self._pending.clear()
        for p in doomed:
            if not p.future.done():
                p.future.set_exception(exc)
