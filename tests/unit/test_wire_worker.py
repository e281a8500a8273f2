"""WorkerServer + RemoteRunner over real gRPC on loopback, without Ray.

The served model is a real LocalRunner over a tiny random Llama (fixed seed); a second LocalRunner over the same
model is the reference: whatever goes through the wire must come back bit-identical (fp32) to what the reference
computes in process.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitfusion import wire
from logitfusion.actors import worker as worker_mod
from logitfusion.actors.remote import RemoteRunner, replay_plans
from logitfusion.actors.worker import (
    HEALTH_SERVICE_NAME,
    STREAM_ID_METADATA_KEY,
    WorkerServer,
    check_response_size,
    scope_plan,
)
from logitfusion.engine.runner import (
    ExtendOp,
    ModelRunner,
    RunnerError,
    RunnerInfo,
    RunnerUnavailable,
    StepPlan,
    resolved,
)
from logitfusion.engine.testing import TINY_FAMILY, tiny_runner
from logitfusion.v1 import worker_pb2 as pb
from logitfusion.v1 import worker_pb2_grpc

pytestmark = pytest.mark.timeout(120)

torch.set_num_threads(1)


def _ext(seq_id: str, tokens, want="last") -> ExtendOp:
    return ExtendOp(seq_id, tuple(tokens), want)


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(g.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))


@pytest.fixture
def served():
    runner = tiny_runner("large", threaded=False)
    yield runner
    runner.close()


@pytest.fixture
def reference():
    runner = tiny_runner("large", threaded=False)
    yield runner
    runner.close()


@pytest.fixture
def server(served):
    srv = WorkerServer(served)
    yield srv
    srv.stop(0)


@pytest.fixture
def remote(server):
    runner = RemoteRunner("large", lambda: server.address, reconnect_timeout_s=10)
    yield runner
    runner.close()


def _raw_stream(address: str, stream_id: str | None = None, **channel_kw):
    """A hand-driven Step stream: (send(request), call, channel)."""
    import queue

    channel = grpc.insecure_channel(address, **channel_kw)
    stub = worker_pb2_grpc.WorkerStub(channel)
    q: queue.SimpleQueue = queue.SimpleQueue()

    def pump() -> Iterator[pb.StepRequest]:
        while (r := q.get()) is not None:
            yield r

    metadata = ((STREAM_ID_METADATA_KEY, stream_id),) if stream_id else None
    call = stub.Step(pump(), metadata=metadata)
    return q.put, call, channel


# ------------------------------------------------------------------------------------------ equality with local


def test_every_op_matches_the_in_process_runner_exactly(remote, reference, served, server):
    plans = [
        StepPlan(extends=(_ext("a", [1, 2, 3, 4, 5]), _ext("b", [9, 8]), _ext("c", [7, 7, 7], "all"))),  # prefill
        StepPlan(extends=(_ext("a", [11]), _ext("b", [12]), _ext("c", [13]))),  # decode
        StepPlan(extends=(_ext("a", [21, 22, 23], "all"), _ext("b", [24]))),  # speculative verify + decode
        StepPlan(truncates=(("a", 6),), extends=(_ext("a", [31]), _ext("c", [32]))),  # roll back, continue
        StepPlan(releases=("b",), extends=(_ext("b", [40, 41]), _ext("a", [42]))),  # release, re-prefill the id
        StepPlan(truncates=(("c", 0),), releases=("a",)),  # no extends: empty result
    ]
    for plan in plans:
        got, want = remote.step(plan), reference.step(plan)
        assert _same(got, want), plan
        assert remote.sequences() == reference.sequences()
        (stream,) = server.servicer._streams.values()  # the worker's own table of this stream, kept without asking
        assert {k.split("/", 1)[1]: n for k, n in stream.lengths.items()} == reference.sequences()
    assert remote.history("b") == (40, 41)
    assert remote.history("c") == ()
    assert len(served.sequences()) == len(reference.sequences())  # scoped names on the worker, same count


def test_prompt_features_come_back_over_the_stream_exactly(remote, reference):
    plan = StepPlan(extends=(ExtendOp("a", (1, 2, 3, 4), "last", features_tokens=3), _ext("b", [5, 6]),
                             ExtendOp("c", (7, 8), "all", features_tokens=2)))
    got, want = remote.step(plan), reference.step(plan)
    assert len(got) == 5 and _same(got, want)  # 3 logits, then the features of a and c, in plan order
    assert got[3].shape == (TINY_FAMILY["large"].hidden_size,)


def test_bfloat16_logits_are_the_rounded_fp32_logits(server, reference):
    rr = RemoteRunner("large", lambda: server.address, logits_dtype="bfloat16")
    try:
        plan = StepPlan(extends=(_ext("a", [1, 2, 3], "all"),))
        (got,), (want,) = rr.step(plan), reference.step(plan)
        assert got.dtype == torch.float32 and torch.equal(got, want.to(torch.bfloat16).float())
    finally:
        rr.close()


def test_describe_and_health(server, remote, served):
    assert remote.describe() == served.describe()
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.address))
    assert stub.Describe(pb.DescribeRequest()).pid == os.getpid()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.address))
    for service in ("", HEALTH_SERVICE_NAME):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------------ streams and leaks


def test_two_streams_keep_the_same_seq_ids_apart(server, reference):
    r1 = RemoteRunner("large", lambda: server.address)
    r2 = RemoteRunner("large", lambda: server.address)
    try:
        r1.step(StepPlan(extends=(_ext("a", [1, 2, 3]),)))
        (got,) = r2.step(StepPlan(extends=(_ext("a", [5]),)))  # the same id, another stream: a fresh prefill
        (want,) = reference.step(StepPlan(extends=(_ext("x", [5]),)))
        assert torch.equal(got, want)
        assert r1.sequences() == {"a": 3} and r2.sequences() == {"a": 1}
    finally:
        r1.close()
        r2.close()


def test_closing_the_client_releases_its_sequences(server, served):
    rr = RemoteRunner("large", lambda: server.address)
    rr.step(StepPlan(extends=(_ext("a", [1, 2]), _ext("b", [3]))))
    assert len(served.sequences()) == 2
    rr.close()
    assert server.wait_idle(10)
    assert served.sequences() == {}
    rr.close()  # idempotent
    with pytest.raises(RunnerUnavailable, match="closed"):
        rr.step(StepPlan())


@pytest.mark.parametrize("how", ["cancel", "channel_close"])
def test_a_vanished_client_frees_its_sequences(server, served, how):
    send, call, channel = _raw_stream(server.address)
    send(pb.StepRequest(step_id=1, extends=[pb.Extend(seq_id="a", token_ids=[1, 2, 3])]))
    assert next(call).WhichOneof("outcome") == "logits"
    assert served.sequences() != {}
    if how == "cancel":
        call.cancel()
    else:
        channel.close()
    assert server.wait_idle(10)
    assert served.sequences() == {}
    send(None)


def test_sequences_rpc_is_scoped_by_stream_id(server):
    send, call, channel = _raw_stream(server.address, stream_id="coord-1")
    send(pb.StepRequest(step_id=1, extends=[pb.Extend(seq_id="a", token_ids=[4, 5])]))
    next(call)
    stub = worker_pb2_grpc.WorkerStub(channel)
    mine = stub.Sequences(pb.SequencesRequest(stream_id="coord-1")).sequences
    assert [(s.seq_id, s.length_tokens) for s in mine] == [("a", 2)]
    every = stub.Sequences(pb.SequencesRequest()).sequences
    assert [(s.seq_id, s.length_tokens) for s in every] == [("coord-1/a", 2)]
    assert not stub.Sequences(pb.SequencesRequest(stream_id="other")).sequences
    send(None)
    list(call)  # the worker ends the stream after releasing
    channel.close()


def test_stream_ids_are_checked(server):
    _, bad, ch1 = _raw_stream(server.address, stream_id="no spaces allowed")
    with pytest.raises(grpc.RpcError) as err:
        next(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and STREAM_ID_METADATA_KEY in err.value.details()
    send, first, ch2 = _raw_stream(server.address, stream_id="dup")
    send(pb.StepRequest(step_id=1))
    next(first)  # the first stream with this id is open
    _, second, ch3 = _raw_stream(server.address, stream_id="dup")
    with pytest.raises(grpc.RpcError) as err:
        next(second)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    send(None)
    for ch in (ch1, ch2, ch3):
        ch.close()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("request_kw", "code", "pattern"),
    [
        ({"truncates": [pb.Truncate(seq_id="nope", length_tokens=1)]}, "INVALID_ARGUMENT", r"unknown seq_id 'nope'"),
        ({"extends": [pb.Extend(seq_id="a", token_ids=[97])]}, "INVALID_ARGUMENT", r"token id 97 is outside"),
        ({"extends": [pb.Extend(seq_id="a", token_ids=[-1])]}, "INVALID_ARGUMENT", r"negative token id -1"),
        ({"extends": [pb.Extend(seq_id="", token_ids=[1])]}, "INVALID_ARGUMENT", r"extends\[0\].seq_id: empty"),
        (
            {"extends": [pb.Extend(seq_id="a", token_ids=[1]), pb.Extend(seq_id="a", token_ids=[1])]},
            "INVALID_ARGUMENT",
            r"'a' is extended twice",
        ),
        ({"extends": [pb.Extend(seq_id="a", token_ids=[1] * 300)]}, "INVALID_ARGUMENT", r"exceeds max_length_tokens"),
        ({"logits_dtype": pb.Tensor.DTYPE_INT64}, "INVALID_ARGUMENT", r"logits_dtype: int64"),
    ],
)
def test_bad_ops_get_an_error_and_the_stream_stays_open(server, served, reference, request_kw, code, pattern):
    send, call, channel = _raw_stream(server.address, stream_id="s-1")
    send(pb.StepRequest(step_id=1, extends=[pb.Extend(seq_id="a", token_ids=[1, 2, 3])]))
    next(call)
    send(pb.StepRequest(step_id=2, **request_kw))
    resp = next(call)
    assert resp.step_id == 2 and resp.WhichOneof("outcome") == "error"
    assert pb.StepError.Code.Name(resp.error.code) == f"CODE_{code}"
    assert not resp.error.sequences_changed
    assert re.search(pattern, resp.error.message), resp.error.message
    assert "s-1/" not in resp.error.message  # the worker-side stream scope never leaks out
    # the same stream goes on, and its state was not disturbed
    send(pb.StepRequest(step_id=3, extends=[pb.Extend(seq_id="a", token_ids=[4])]))
    ok = next(call)
    reference.step(StepPlan(extends=(_ext("a", [1, 2, 3]),)))
    (want,) = reference.step(StepPlan(extends=(_ext("a", [4]),)))
    assert ok.step_id == 3 and ok.WhichOneof("outcome") == "logits"
    assert torch.equal(wire.split_logits(ok.logits, [1], 97)[0], want)
    send(None)
    channel.close()


def test_remote_runner_raises_runner_error_and_keeps_its_histories(remote, reference):
    remote.step(StepPlan(extends=(_ext("a", [1, 2]),)))
    with pytest.raises(RunnerError, match=r"large \(worker 127.0.0.1:\d+\) refused step: \[INVALID_ARGUMENT\]"):
        remote.step(StepPlan(truncates=(("a", 5),)))
    assert remote.history("a") == (1, 2)
    reference.step(StepPlan(extends=(_ext("a", [1, 2]),)))
    assert _same(remote.step(StepPlan(extends=(_ext("a", [3]),))), reference.step(StepPlan(extends=(_ext("a", [3]),))))


def test_a_response_over_the_message_limit_is_refused_before_running(served):
    srv = WorkerServer(served, max_message_bytes=64 * 1024)
    rr = RemoteRunner("large", lambda: srv.address, max_message_bytes=64 * 1024)
    try:
        with pytest.raises(RunnerError, match=r"RESOURCE_EXHAUSTED.*200 rows x 97 columns.*max_message_bytes=65536"):
            rr.step(StepPlan(extends=(_ext("a", [1] * 200, "all"),)))
        assert served.sequences() == {}  # nothing ran
        assert len(rr.step(StepPlan(extends=(_ext("a", [1] * 200),)))) == 1  # want="last" fits
    finally:
        rr.close()
        srv.stop(0)


def test_a_request_over_the_message_limit_fails_in_the_client(server):
    rr = RemoteRunner("large", lambda: server.address, max_message_bytes=1024)
    try:
        with pytest.raises(RunnerError, match=r"step request of \d+ bytes exceeds max_message_bytes=1024"):
            rr.step(StepPlan(extends=(_ext("a", list(range(90)) * 20),)))
    finally:
        rr.close()


def test_an_oversized_raw_message_kills_only_its_own_stream(served):
    srv = WorkerServer(served, max_message_bytes=1024)
    try:
        send, call, channel = _raw_stream(srv.address)
        send(pb.StepRequest(step_id=1, extends=[pb.Extend(seq_id="a", token_ids=[1] * 5)]))
        next(call)
        send(pb.StepRequest(step_id=2, extends=[pb.Extend(seq_id="b", token_ids=[1] * 5000)]))
        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert srv.wait_idle(10) and served.sequences() == {}
        rr = RemoteRunner("large", lambda: srv.address, max_message_bytes=1024)  # the server still serves
        assert len(rr.step(StepPlan(extends=(_ext("a", [1]),)))) == 1
        rr.close()
        send(None)
        channel.close()
    finally:
        srv.stop(0)


def test_garbage_bytes_on_the_stream_do_not_hurt_the_server(server, served, remote):
    channel = grpc.insecure_channel(server.address)
    raw = channel.stream_stream("/logitfusion.v1.Worker/Step", request_serializer=None, response_deserializer=None)
    call = raw(iter([pb.StepRequest(step_id=1, extends=[pb.Extend(seq_id="g", token_ids=[1])]).SerializeToString(),
                     b"\xff\xfe\xfd garbage \x00\x01"]))
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INVALID_ARGUMENT)
    channel.close()
    assert len(remote.step(StepPlan(extends=(_ext("a", [1]),)))) == 1  # other streams unaffected
    assert remote.sequences() == {"a": 1}
    remote.close()
    assert server.wait_idle(10) and served.sequences() == {}


# ------------------------------------------------------------------------------------------ failures of the worker


class _Gate(ModelRunner):
    """Fault injection: a LocalRunner whose step number ``block_at`` waits until ``release`` is set, or whose
    step ``crash_at`` applies the plan and then raises (a half-applied step)."""

    def __init__(self, inner: ModelRunner, block_at: int = -1, crash_at: int = -1) -> None:
        self.inner, self.block_at, self.crash_at = inner, block_at, crash_at
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()

    def submit(self, plan: StepPlan):
        self.calls += 1
        if self.calls == self.block_at:
            self.entered.set()
            self.release.wait(60)
        result = self.inner.submit(plan)
        if self.calls == self.crash_at:
            result.result()
            raise RuntimeError("device lost after the forward")
        return result

    def close(self) -> None:
        self.release.set()
        self.inner.close()


def _greedy(runner: ModelRunner, prompt, steps: int, between: Callable[[int], None] = lambda i: None) -> list[int]:
    """Greedy decoding of one sequence; ``between(i)`` runs after token i is chosen, before it is sent."""
    (logits,) = runner.step(StepPlan(extends=(_ext("s", prompt),)))
    out = []
    for i in range(steps):
        out.append(int(logits[-1].argmax()))
        between(i)
        (logits,) = runner.step(StepPlan(extends=(_ext("s", [out[-1]]),)))
    return out


def test_a_dead_worker_is_replaced_and_greedy_output_is_unchanged(reference):
    prompt, steps = [5, 17, 33, 2, 60], 12
    want = _greedy(reference, prompt, steps)
    first = tiny_runner("large", threaded=False)
    second = tiny_runner("large", threaded=False)
    servers = [WorkerServer(first)]
    rr = RemoteRunner("large", lambda: servers[-1].address, reconnect_timeout_s=30)

    def kill_and_replace(i: int) -> None:
        if i == 5:
            servers[0].stop(0)  # the worker dies between two steps
            servers.append(WorkerServer(second))  # "Ray restarted it" on a new port

    try:
        assert _greedy(rr, prompt, steps, kill_and_replace) == want
        assert rr.reconnects == 1
        assert second.sequences() and rr.sequences() == {"s": len(prompt) + steps}
    finally:
        rr.close()
        for s in servers:
            s.stop(0)
        first.close()
        second.close()


def test_a_step_in_flight_when_the_worker_dies_is_replayed_not_failed(reference):
    prompt = [3, 1, 4, 1, 5]
    (want_prefill,) = reference.step(StepPlan(extends=(_ext("s", prompt),)))
    (want,) = reference.step(StepPlan(extends=(_ext("s", [9]), )))
    gate = _Gate(tiny_runner("large", threaded=False), block_at=2)
    spare = tiny_runner("large", threaded=False)
    servers = [WorkerServer(gate)]
    rr = RemoteRunner("large", lambda: servers[-1].address, reconnect_timeout_s=30)
    try:
        (got_prefill,) = rr.step(StepPlan(extends=(_ext("s", prompt),)))
        assert torch.equal(got_prefill, want_prefill)
        fut = rr.submit(StepPlan(extends=(_ext("s", [9]),)))
        assert gate.entered.wait(30)  # the worker is inside the step ...
        servers.append(WorkerServer(spare))
        stopping = threading.Thread(target=servers[0].stop, args=(0,))  # ... when it dies
        stopping.start()
        (got,) = fut.result(timeout=60)
        gate.release.set()  # let the dead worker's stuck handler finish, so its server can shut down
        stopping.join(30)
        # the fresh worker computed the whole history as one prefill: the same numbers up to float reordering
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert int(got.argmax()) == int(want.argmax())
        assert rr.history("s") == (*prompt, 9) and list(spare.sequences().values()) == [6]
    finally:
        rr.close()
        gate.close()
        for s in servers:
            s.stop(0)
        spare.close()


def test_no_worker_within_the_timeout_fails_with_runner_unavailable(served, reference):
    srv = WorkerServer(served)
    servers = [srv]
    rr = RemoteRunner("large", lambda: servers[-1].address, reconnect_timeout_s=1.0)
    spare = tiny_runner("large", threaded=False)
    try:
        rr.step(StepPlan(extends=(_ext("a", [1]),)))
        srv.stop(0)
        address = srv.address
        with pytest.raises(RunnerUnavailable, match=rf"large: no .* within reconnect_timeout_s=1.0 .*{address}"):
            rr.step(StepPlan(extends=(_ext("a", [2]),)))
        assert rr.history("a") == ()  # given up: the sequences are forgotten, the caller re-sends histories
        servers.append(WorkerServer(spare))  # a worker is back: the next submit reconnects
        (got,) = rr.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        (want,) = reference.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        assert torch.equal(got, want) and rr.sequences() == {"a": 2}
    finally:
        rr.close()
        servers[-1].stop(0)
        spare.close()


def test_a_worker_that_comes_back_with_another_model_is_refused(served):
    srv = WorkerServer(served)
    other = tiny_runner("small", threaded=False)
    servers = [srv]
    rr = RemoteRunner("large", lambda: servers[-1].address, reconnect_timeout_s=5)
    try:
        rr.step(StepPlan(extends=(_ext("a", [1]),)))
        srv.stop(0)
        servers.append(WorkerServer(other))
        with pytest.raises(RunnerUnavailable, match=r"serves another model \(name: 'large' -> 'small'"):
            rr.step(StepPlan(extends=(_ext("a", [2]),)))
    finally:
        rr.close()
        servers[-1].stop(0)
        other.close()


def test_a_half_applied_step_re_synchronises_on_a_fresh_stream(reference):
    gate = _Gate(tiny_runner("large", threaded=False), crash_at=2)
    srv = WorkerServer(gate)
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        rr.step(StepPlan(extends=(_ext("a", [1, 2, 3]),)))
        with pytest.raises(RunnerError, match=r"\[INTERNAL\] RuntimeError: device lost"):
            rr.step(StepPlan(extends=(_ext("a", [4]),)))  # the worker extended "a" and then failed
        assert rr.history("a") == (1, 2, 3)
        reference.step(StepPlan(extends=(_ext("a", [1, 2, 3]),)))
        (want,) = reference.step(StepPlan(extends=(_ext("a", [4]),)))
        (got,) = rr.step(StepPlan(extends=(_ext("a", [4]),)))  # on a fresh stream: "a" re-created with 3 tokens
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert rr.reconnects == 1 and rr.sequences() == {"a": 4}
        assert srv.wait_streams(1, timeout_s=10)  # the old stream is gone and released its copy of "a"
        assert list(gate.sequences().values()) == [4]
    finally:
        rr.close()
        srv.stop(0)
        gate.close()


class _BadShape(_Gate):
    """A runner that answers plans extending "bad" with logits of the wrong width (a runner bug)."""

    def submit(self, plan: StepPlan):
        result = self.inner.submit(plan)
        if any(e.seq_id.endswith("/bad") for e in plan.extends):
            result.result()
            return resolved([torch.zeros(1, 5)] * len(plan.extends))  # 5 columns, the model has 97
        return result


def test_logits_of_the_wrong_shape_become_an_internal_error_and_a_resync(reference):
    runner = _BadShape(tiny_runner("large", threaded=False))
    srv = WorkerServer(runner)
    rr = RemoteRunner("large", lambda: srv.address)
    try:
        rr.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        with pytest.raises(RunnerError, match=r"\[INTERNAL\] RuntimeError: shape '\[1, 97\]' is invalid"):
            rr.step(StepPlan(extends=(_ext("bad", [1]),)))
        assert rr.history("bad") == () and rr.history("a") == (1, 2)
        reference.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        assert _same(rr.step(StepPlan(extends=(_ext("a", [3]),))), reference.step(StepPlan(extends=(_ext("a", [3]),))))
        assert rr.reconnects == 1  # re-synchronised on a fresh stream
        assert srv.wait_streams(1, timeout_s=10) and sorted(rr.sequences()) == ["a"]
    finally:
        rr.close()
        srv.stop(0)
        runner.close()


class _CrashOnPoison(worker_mod._WorkerServicer):
    """A worker that dies (its stream ends UNAVAILABLE) whenever a plan extends "poison"."""

    crashes = 0

    def Step(self, request_iterator, context):
        def watched():
            for request in request_iterator:
                if any(e.seq_id == "poison" for e in request.extends):
                    type(self).crashes += 1
                    context.abort(grpc.StatusCode.UNAVAILABLE, "worker process died")
                yield request

        yield from super().Step(watched(), context)


def test_a_plan_that_kills_every_worker_fails_after_max_breaks(reference, served):
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(4))
    worker_pb2_grpc.add_WorkerServicer_to_server(_CrashOnPoison(served, 2**20, 4), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    rr = RemoteRunner("large", lambda: f"127.0.0.1:{port}", max_breaks_per_step=3, reconnect_timeout_s=30)
    try:
        rr.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        with pytest.raises(RunnerError, match=r"failed on this step 3 time\(s\): UNAVAILABLE: worker process died"):
            rr.step(StepPlan(extends=(_ext("poison", [1]),)))
        assert _CrashOnPoison.crashes == 3
        reference.step(StepPlan(extends=(_ext("a", [1, 2]),)))
        # the runner goes on: "a" was replayed on every fresh stream
        (got,) = rr.step(StepPlan(extends=(_ext("a", [3]),)))
        (want,) = reference.step(StepPlan(extends=(_ext("a", [3]),)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert rr.reconnects == 3
    finally:
        rr.close()
        server.stop(0).wait(10)


# ------------------------------------------------------------------------------------------ pure helpers


def test_replay_plans_pack_whole_sequences_under_the_budget():
    plans = replay_plans({"a": [1] * 3, "b": [2] * 4, "c": [3] * 10, "d": []}, max_tokens_per_step=8)
    assert [[(e.seq_id, len(e.token_ids)) for e in p.extends] for p in plans] == [[("a", 3), ("b", 4)], [("c", 10)]]
    assert all(e.want == "last" for p in plans for e in p.extends)


def test_scope_plan_and_response_size_check():
    plan = StepPlan(extends=(_ext("a", [1, 2], "all"),), truncates=(("b", 1),), releases=("c",))
    scoped = scope_plan(plan, "s1/")
    assert scoped.extends[0].seq_id == "s1/a" and scoped.truncates == (("s1/b", 1),) and scoped.releases == ("s1/c",)
    check_response_size(plan, 1000, torch.float32, 2 * 1000 * 4 + 70)
    with pytest.raises(ValueError, match=r"2 rows x 1000 columns of float32 need about 8070 bytes"):
        check_response_size(plan, 1000, torch.float32, 8069)
    # the estimate is an upper bound of the real message
    resp = wire.logits_response(2**60, [torch.zeros(2, 1000)], torch.float32, 1000)
    assert resp.ByteSize() <= 8070


def test_constructor_checks(server):
    with pytest.raises(ValueError, match=r"logits_dtype must be one of"):
        RemoteRunner("large", lambda: server.address, logits_dtype="float16")
    with pytest.raises(ValueError, match=r"reconnect_timeout_s=0"):
        RemoteRunner("large", lambda: server.address, reconnect_timeout_s=0)
    with pytest.raises(RunnerUnavailable, match=r"small: the worker at 127.0.0.1:\d+ serves model 'large', not"):
        RemoteRunner("small", lambda: server.address)
    with pytest.raises(RunnerUnavailable, match=r"no worker reachable within reconnect_timeout_s=0.3"):
        RemoteRunner("large", lambda: "127.0.0.1:1", reconnect_timeout_s=0.3)
    assert TINY_FAMILY["large"].max_length_tokens == 256  # the bad-op table above relies on it


# ------------------------------------------------------------------------------------------ the actor class, no Ray


def test_model_worker_serves_its_spec_without_ray(reference):
    import functools

    from logitfusion.actors.worker import ModelWorker, WorkerSpec

    worker = ModelWorker(WorkerSpec(name="large", factory=functools.partial(tiny_runner, "large", threaded=False)))
    rr = RemoteRunner("large", worker.address)
    try:
        assert worker.address().startswith("127.0.0.1:") and worker.pid() == os.getpid()
        assert worker.describe() == reference.describe()
        plan = StepPlan(extends=(_ext("a", [3, 4, 5]),))
        assert _same(rr.step(plan), reference.step(plan))
        assert list(worker.sequences().values()) == [3]
    finally:
        rr.close()
        worker.shutdown(0)
    assert worker.sequences() == {}


def test_worker_spec_and_placement_helpers():
    from logitfusion.actors.worker import WorkerSpec, resolve_bind_host, resolve_device

    with pytest.raises(ValueError, match=r"'x': set model_path or factory"):
        WorkerSpec(name="x")
    with pytest.raises(ValueError, match=r"WorkerSpec.device='tpu'"):
        WorkerSpec(name="x", model_path="/m", device="tpu")
    with pytest.raises(ValueError, match=r"max_message_bytes=0 must be in 1..2147483647"):
        WorkerSpec(name="x", model_path="/m", max_message_bytes=0)
    assert resolve_device("auto", []) == "cpu"
    assert resolve_device("auto", [0]) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", [0]) == "cpu"
    assert resolve_bind_host("127.0.0.1", lambda: "10.0.0.5") == ("127.0.0.1", "127.0.0.1")
    assert resolve_bind_host("node", lambda: "10.0.0.5") == ("10.0.0.5", "10.0.0.5")
    assert resolve_bind_host("0.0.0.0", lambda: "10.0.0.5") == ("0.0.0.0", "10.0.0.5")
