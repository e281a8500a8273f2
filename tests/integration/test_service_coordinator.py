"""The Coordinator without Ray or Serve: tiny in-process models (engine.testing) behind the runner contract.

What the Serve tests cannot steer precisely lives here: a runner that fails once or for good (fault injection by a
wrapping test double), the server-side request timeout, the stream bound, shutdown with requests running, and the
start-up vocabulary checks (the Decoder's fingerprint check and the tokenizer comparison on real checkpoints).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path

import pytest

from logitfusion.actors.coordinator import Coordinator, RequestStream, TextCodec
from logitfusion.limits import Limits
from logitfusion.engine.decoder import GenerationRequest
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.runner import ModelRunner, RunnerError, RunnerInfo, RunnerUnavailable, StepPlan, failed
from logitfusion.engine.testing import TINY_FAMILY, TINY_VOCAB_SIZE, tiny_decode, tiny_encode, tiny_llama, tiny_runner
from logitfusion.errors import DeadlineExceeded, ModelUnavailable, Overloaded
from logitfusion.fusion import presets

import service_models  # tests/integration/service_models.py
from service_models import wait_for

pytestmark = pytest.mark.timeout(120)

MODELS = ("large", "small", "expert_a", "expert_b")
DLF = presets.dlf("large", "small", ["expert_a", "expert_b"], solver="joint")
LARGE = presets.single("large")
CODEC = TextCodec(encode=tiny_encode, decode=tiny_decode, eos_token_ids=())


class FlakyRunner(ModelRunner):
    """A runner that fails chosen steps: ``fail(n, exc)`` makes the next n submits fail with exc (evil forward)."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._failures: list[BaseException] = []
        self.submits = 0

    def fail(self, times: int, exc: BaseException) -> None:
        with self._lock:
            self._failures.extend([exc] * times)

    def describe(self) -> RunnerInfo:
        return self.inner.describe()

    def submit(self, plan: StepPlan) -> Future:
        with self._lock:
            self.submits += 1
            exc = self._failures.pop(0) if self._failures else None
        return failed(exc) if exc is not None else self.inner.submit(plan)

    def sequences(self) -> dict[str, int]:
        return self.inner.sequences()

    def close(self) -> None:
        self.inner.close()


LONG = 3000  # tokens: far more than any test lets a request run
DEFAULT_LIMITS = Limits(max_concurrent_requests=8, max_batch_size=8, max_new_tokens=LONG)


def make(limits: Limits | None = None, flaky: bool = False, **kw) -> Coordinator:
    # 4096 positions so a request can be long enough to be certainly running when a test interferes with it
    runners = {n: tiny_runner(n, replace(TINY_FAMILY[n], max_length_tokens=4096)) for n in MODELS}
    if flaky:
        runners = {n: FlakyRunner(r) for n, r in runners.items()}
    return Coordinator(runners, codec=CODEC, limits=limits or DEFAULT_LIMITS, **kw)


def request(rid: str, prompt: str = "hello", n: int = 16, recipe=DLF, **kw) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=tiny_encode(prompt), recipe=recipe, max_new_tokens=n, **kw)


def tokens(stream: RequestStream) -> list[int]:
    return [t.token_id for chunk in stream for t in chunk.tokens]




def idle(c: Coordinator) -> bool:
    return not c.active_requests() and not any(c.sequences().values())


@pytest.fixture
def coord():
    c = make()
    yield c
    c.close()


def test_chunks_carry_tokens_weights_and_the_end(coord):
    chunks = list(coord.submit(request("a", n=5)))
    assert [c.step for c in chunks] == [0, 1, 2, 3, 4]
    assert all(len(c.tokens) == 1 and [e for e, _ in c.weights] == ["expert_a", "expert_b"] for c in chunks)
    end = chunks[-1].finished
    assert end.reason == "length" and end.completion_tokens == 5 and end.steps == 5
    assert end.prompt_tokens == len("hello") and end.text == "".join(t.text for c in chunks for t in c.tokens)
    wait_for(lambda: idle(coord), what="released sequences")


def test_stop_string_and_stop_token_endings(coord):
    free = tokens(coord.submit(request("free", n=12)))
    text = tiny_decode(free)
    stop = text[6:8]
    cut = list(coord.submit(request("cut", n=12, stop_strings=(stop,))))[-1].finished
    assert cut.reason == "stop" and cut.stop == stop and cut.text == text[: text.index(stop)]
    eos = list(coord.submit(request("eos", n=12, stop_token_ids=(free[3],))))[-1].finished
    assert eos.reason == "eos" and eos.completion_tokens == free.index(free[3]) + 1


def test_concurrent_requests_match_their_solo_runs(coord):
    jobs = [(f"p{i}", f"prompt{i}", 6 + i, DLF if i % 2 else LARGE) for i in range(8)]
    solo = {rid: tokens(coord.submit(request(rid, p, n, r))) for rid, p, n, r in jobs}
    steps0 = coord.steps_run
    streams = {rid: coord.submit(request(rid + "x", p, n, r)) for rid, p, n, r in jobs}
    got = {rid: tokens(s) for rid, s in streams.items()}
    assert got == solo
    assert coord.steps_run - steps0 < sum(n for _, _, n, _ in jobs)


def test_async_iteration_gives_the_same_tokens(coord):
    solo = tokens(coord.submit(request("sync", n=7)))

    async def run() -> list[int]:
        out = []
        async for chunk in coord.submit(request("async", n=7)):
            out.extend(t.token_id for t in chunk.tokens)
        return out

    assert asyncio.run(run()) == solo


def test_overload_is_refused_at_once_and_admission_reopens():
    c = make(Limits(max_concurrent_requests=2, max_batch_size=2, max_new_tokens=LONG))
    try:
        a, b = c.submit(request("a", n=LONG)), c.submit(request("b", n=LONG))
        with pytest.raises(Overloaded, match=r"max_concurrent_requests is 2"):
            c.submit(request("c", n=4))
        c.abort("a")
        c.abort("b")
        wait_for(lambda: idle(c), what="both aborted")
        assert len(tokens(c.submit(request("d", n=4)))) == 4
        del a, b
    finally:
        c.close()


def test_request_timeout_ends_the_request_and_frees_its_sequences():
    c = make(Limits(max_concurrent_requests=4, max_batch_size=4, max_new_tokens=LONG, request_timeout_s=0.3))
    try:
        stream = c.submit(request("slow", n=LONG, recipe=LARGE))
        got = 0
        with pytest.raises(DeadlineExceeded, match=r"request_timeout_s is 0.3"):
            for chunk in stream:
                got += len(chunk.tokens)
        assert got < LONG
        wait_for(lambda: idle(c), what="released sequences after the timeout")
    finally:
        c.close()


def test_a_transient_runner_failure_is_retried_and_output_is_unchanged():
    c = make(flaky=True)
    try:
        expected = tokens(c.submit(request("ref", n=20)))
        stream = c.submit(request("flaky", n=20))
        first = next(iter(stream))
        c.runners["expert_b"].fail(2, RunnerError("injected: bad step"))
        got = [t.token_id for t in first.tokens] + tokens(stream)
        assert got == expected
    finally:
        c.close()


def test_a_model_that_stays_down_fails_only_its_requests():
    c = make(flaky=True, max_step_retries=2)
    try:
        expected_large = tokens(c.submit(request("ref", n=40, recipe=LARGE)))
        fused = c.submit(request("fused", n=LONG))
        alone = c.submit(request("alone", n=40, recipe=LARGE))
        next(iter(fused))
        c.runners["expert_b"].fail(1, RunnerUnavailable("injected: worker gone"))
        with pytest.raises(ModelUnavailable, match="expert_b"):
            tokens(fused)
        assert tokens(alone) == expected_large  # a request that never reads expert_b is untouched
        wait_for(lambda: idle(c), what="released sequences")
        # the model is reachable again: new requests reading it work
        assert len(tokens(c.submit(request("again", n=5)))) == 5
    finally:
        c.close()


def test_the_stream_is_bounded_even_when_nobody_reads(coord):
    stream = coord.submit(request("unread", n=30))
    wait_for(lambda: stream.ended, what="the request to finish unread")
    assert stream.capacity == 32 and len(stream._items) == 30
    assert len(tokens(stream)) == 30


def test_close_fails_running_requests_and_frees_everything():
    c = make()
    stream = c.submit(request("running", n=LONG))
    next(iter(stream))
    c.close()
    with pytest.raises(ModelUnavailable, match="shutting down"):
        tokens(stream)
    assert not any(c.sequences().values())
    with pytest.raises(ModelUnavailable):
        c.submit(request("late", n=3))


def test_different_vocabularies_are_refused_naming_both_models():
    runners = {n: tiny_runner(n) for n in ("large", "small")}
    runners["expert_x"] = LocalRunner(
        tiny_llama(TINY_FAMILY["expert_a"]), name="expert_x", vocab_size=TINY_VOCAB_SIZE, vocab_fingerprint="f" * 64
    )
    with pytest.raises(ValueError) as info:
        Coordinator(runners, codec=CODEC, limits=Limits())
    assert "'expert_x'" in str(info.value) and "different vocabularies" in str(info.value)


def test_tokenizer_check_names_the_models_and_the_first_difference(tmp_path):
    from logitfusion.cluster.launch import check_vocabularies
    from logitfusion.cluster.topology import load_topology
    from logitfusion.errors import ConfigError

    for name in ("large", "small", "expert_a"):
        service_models.write_model(tmp_path / name, name)
    service_models.write_model(tmp_path / "expert_b", "expert_b", swap_vocab=True)
    topo = load_topology(service_models.write_topology(tmp_path))
    with pytest.raises(ConfigError) as info:
        check_vocabularies(topo)
    msg = str(info.value)
    assert "'large'" in msg and "'expert_b'" in msg and "first differing id" in msg


# ------------------------------------------------------------------------------------------------ the frontend


def frontend(monkeypatch=None, token: str | None = None):
    from logitfusion.cluster.serve_app import FusionFrontend
    from logitfusion.cluster.topology import parse_topology

    data = service_models.topology_dict(Path("/unused"), max_new_tokens=200)
    if token is not None:
        data["serve"]["auth_token_env"] = "LF_TEST_TOKEN"
        monkeypatch.setenv("LF_TEST_TOKEN", token)
    topo = parse_topology(data)
    coordinator = make(topo.limits)
    try:
        return FusionFrontend(topo, coordinator)
    except BaseException:
        coordinator.close()
        raise


def test_frontend_answers_like_the_service():
    from logitfusion.client import build_request

    fe = frontend()
    try:
        done = asyncio.run(fe.generate(build_request("hello", max_new_tokens=6, stop_at_eos=False, preset="dlf_a")))
        assert len(done.token_ids) == 6 and done.recipe == "dlf_a" and len(done.steps) == 6

        async def stream():
            return [m async for m in fe.generate_stream(build_request("hello", max_new_tokens=6, preset="dlf_a"))]

        msgs = asyncio.run(stream())
        assert [t.id for m in msgs for t in m.tokens] == list(done.token_ids)
        assert msgs[-1].HasField("finished") and msgs[-1].finished.text == done.text
        assert fe.health("").status == fe.health("logitfusion.v1.FusionService").status == 1  # SERVING
    finally:
        fe.coordinator.close()


def test_frontend_bearer_token(monkeypatch):
    from logitfusion.errors import ConfigError, Unauthenticated

    fe = frontend(monkeypatch, token="s3cret")
    try:
        fe.authenticate([("authorization", "Bearer s3cret")])
        for meta in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
            with pytest.raises(Unauthenticated, match="authorization"):
                fe.authenticate(meta)
    finally:
        fe.coordinator.close()
    monkeypatch.setenv("LF_TEST_TOKEN", "")
    with pytest.raises(ConfigError, match="LF_TEST_TOKEN"):
        frontend(monkeypatch, token="")


def test_a_stalled_runner_holds_up_only_what_reads_it_scoring_included():
    """expert_b stops answering: a generation reading it ends at its deadline, scoring under a recipe that reads
    it waits and fails at limits.request_timeout_s, scoring and generation on the large model alone go on; once
    expert_b answers again, everything is freed and scores are what they were."""
    from logitfusion.engine.testing import StallingRunner

    runners = {n: tiny_runner(n, replace(TINY_FAMILY[n], max_length_tokens=4096)) for n in MODELS}
    stall = runners["expert_b"] = StallingRunner(runners["expert_b"])
    limits = Limits(max_concurrent_requests=8, max_batch_size=8, max_new_tokens=LONG, request_timeout_s=3.0)
    c = Coordinator(runners, codec=CODEC, limits=limits, stall_timeout_s=0.3)
    try:
        ids = tiny_encode("scored")
        ref = c.score(ids, DLF).result(timeout=60)
        large_ref = tokens(c.submit(request("large_ref", n=20, recipe=LARGE)))
        stall.armed = True
        parked = c.submit(request("parked", n=LONG))
        wait_for(lambda: c.decoder.pending_models() == {"expert_b"}, what="expert_b pending")
        waiting = c.score(ids, DLF)
        assert c.score(ids, LARGE).result(timeout=60).token_logprobs  # the large model alone: not held up
        assert tokens(c.submit(request("large", n=20, recipe=LARGE))) == large_ref
        with pytest.raises(DeadlineExceeded, match="model 'expert_b', which does not answer"):
            waiting.result(timeout=60)
        with pytest.raises(DeadlineExceeded, match="request parked ran longer than its timeout of 3 s"):
            tokens(parked)
        stall.release.set()
        wait_for(lambda: idle(c) and not c.decoder.pending_models(), what="the late answer recorded and freed")
        again = c.score(ids, DLF).result(timeout=60)
        assert again.token_logprobs == pytest.approx(ref.token_logprobs, abs=1e-5)
    finally:
        c.close()
