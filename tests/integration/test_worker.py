"""ModelWorker actors on a real local Ray (loopback, small CPU shares) driven by RemoteRunner over gRPC.

The worker process is killed in the middle of a greedy generation; Ray restarts it on a new port, the RemoteRunner
asks the actor for the new address, replays the sequence's history and the generation completes token-identical to
an uninterrupted run in this process.

Token authentication stays on (the `ray_local` fixture of tests/integration/conftest.py, with the one token per test
process that tests/conftest.py sets).
"""

from __future__ import annotations

import functools
import os
import signal

import pytest
import torch

from logitfusion.actors.remote import RemoteRunner
from logitfusion.actors.worker import WorkerSpec, start_worker
from logitfusion.engine.runner import ExtendOp, StepPlan
from logitfusion.engine.testing import tiny_runner

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]  # a worker start takes 10-90 s on a busy 2-core box

SPEC = WorkerSpec(name="large", factory=functools.partial(tiny_runner, "large", threaded=False))


@pytest.fixture
def reference():
    torch.set_num_threads(1)
    runner = tiny_runner("large", threaded=False)
    yield runner
    runner.close()


@pytest.fixture
def worker(ray_local):
    actor = start_worker(SPEC, num_cpus=0.25)
    ray.get(actor.pid.remote(), timeout=300)  # constructed
    yield actor
    ray.kill(actor, no_restart=True)


def _greedy(runner, prompt, steps, between=lambda i: None) -> list[int]:
    (logits,) = runner.step(StepPlan(extends=(ExtendOp("s", tuple(prompt)),)))
    out: list[int] = []
    for i in range(steps):
        out.append(int(logits[-1].argmax()))
        between(i)
        (logits,) = runner.step(StepPlan(extends=(ExtendOp("s", (out[-1],)),)))
    return out


def test_the_cluster_runs_with_token_authentication(ray_local, worker):
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        pytest.skip(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} was set outside the tests")
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled()

    @ray.remote(num_cpus=0.1)
    def auth_env() -> tuple[str | None, bool]:
        return os.environ.get("RAY_AUTH_MODE"), bool(os.environ.get("RAY_AUTH_TOKEN"))

    assert ray.get(auth_env.remote(), timeout=60) == ("token", True)


def test_actor_backed_runner_matches_the_local_runner(worker, reference):
    rr = RemoteRunner.for_actor("large", worker, reconnect_timeout_s=60)
    try:
        assert rr.describe() == ray.get(worker.describe.remote()) == reference.describe()
        plans = [
            StepPlan(extends=(ExtendOp("a", (1, 2, 3, 4)), ExtendOp("b", (5, 6), "all"))),
            StepPlan(extends=(ExtendOp("a", (7,)), ExtendOp("b", (8,)))),
            StepPlan(truncates=(("a", 3),), releases=("b",), extends=(ExtendOp("a", (9, 10), "all"),)),
        ]
        for plan in plans:
            got, want = rr.step(plan), reference.step(plan)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert rr.sequences() == {"a": 5}
        assert list(ray.get(worker.sequences.remote()).values()) == [5]
    finally:
        rr.close()
    assert ray.get(worker.sequences.remote()) == {}  # the closed stream released everything on the worker


@pytest.mark.parametrize("kill", ["sigkill", "ray_kill"])
def test_a_killed_worker_restarts_and_greedy_output_is_identical(worker, reference, kill):
    prompt, steps, kill_after = [5, 17, 33, 2, 60, 41], 16, 6
    want = _greedy(reference, prompt, steps)
    rr = RemoteRunner.for_actor("large", worker, reconnect_timeout_s=240, call_timeout_s=30)
    first_pid = ray.get(worker.pid.remote())
    first_address = ray.get(worker.address.remote())

    def crash(i: int) -> None:
        if i != kill_after:
            return
        if kill == "sigkill":
            os.kill(first_pid, signal.SIGKILL)  # the worker process dies like a crashed GPU process
        else:
            ray.kill(worker, no_restart=False)

    try:
        got = _greedy(rr, prompt, steps, crash)
        assert got == want
        assert rr.reconnects == 1
        assert ray.get(worker.pid.remote()) != first_pid
        assert ray.get(worker.address.remote()) != first_address  # a new incarnation on a new port
        assert rr.sequences() == {"s": len(prompt) + steps}
    finally:
        rr.close()
    assert ray.get(worker.sequences.remote()) == {}


@pytest.mark.timeout(600)
def test_speculative_over_remote_zoo_workers_is_token_identical(ray_local):
    """docs/algorithms.md §8, distributed: the zoo's checkpoints in ModelWorker actors, the Decoder driving
    RemoteRunners. Greedy speculative output (the expert drafts, large + small verify in one extend, truncates after
    rejections travel in the next plan) equals plain output and the in-process run, for a static and a DLF recipe."""
    from logitfusion.engine.decoder import Decoder, GenerationRequest, SpeculativeConfig
    from logitfusion.engine.local import LocalRunner
    from logitfusion.fusion import presets
    from logitfusion.models.zoo import tasks
    from logitfusion.models.zoo.build import load_zoo

    zoo = load_zoo()
    names = ("large", "small", "expert_capital")
    actors = {n: start_worker(WorkerSpec(name=n, model_path=str(zoo.model(n))), num_cpus=0.25, max_restarts=0)
              for n in names}
    local = {n: LocalRunner.from_pretrained(zoo.model(n), n) for n in names}
    remote: dict[str, RemoteRunner] = {}
    try:
        ray.get([a.pid.remote() for a in actors.values()], timeout=300)  # every worker constructed
        remote = {n: RemoteRunner.for_actor(n, a, reconnect_timeout_s=60) for n, a in actors.items()}
        tok = local["large"].tokenizer
        prompts = [tok.encode(it.prompt) for it in tasks.eval_items("capital", limit=3)]
        recipes = {"proxy": presets.proxy_tuning("large", "small", "expert_capital"),
                   "dlf_newton": presets.dlf("large", "small", ["expert_capital"], solver="newton")}
        for kind, recipe in recipes.items():
            def run(runners, spec, kind=kind, recipe=recipe):
                dec = Decoder(runners, eos_token_ids=[tok.eos_token_id], decode_fn=tok.decode)
                reqs = [GenerationRequest(f"{kind}{i}", p, recipe, max_new_tokens=12, speculative=spec)
                        for i, p in enumerate(prompts)]
                return dec.generate(reqs)

            spec = SpeculativeConfig("expert_capital", num_draft_tokens=3)
            plain_local = run(local, None)
            spec_remote = run(remote, spec)
            plain_remote = run(remote, None)
            for a, b, c in zip(plain_local, spec_remote, plain_remote, strict=True):
                assert a.token_ids == b.token_ids == c.token_ids, (kind, tok.decode(a.token_ids), tok.decode(b.token_ids))
            assert sum(r.num_drafted_tokens for r in spec_remote) > 0
            assert sum(r.num_steps for r in spec_remote) <= sum(r.num_steps for r in plain_remote)
            for n, r in remote.items():
                assert r.sequences() == {}, n  # finished requests and rolled-back drafts leave nothing behind
    finally:
        for r in remote.values():
            r.close()
        for r in local.values():
            r.close()
        for a in actors.values():
            ray.kill(a, no_restart=True)


@pytest.mark.timeout(600)
def test_a_sigstopped_worker_holds_up_only_the_requests_that_read_it(ray_local):
    """Issue 10: a worker process that stops answering (SIGSTOP: alive, its stream open, no reply). The request
    that reads it ends with DeadlineExceeded at its deadline; a request that does not read it runs to the end
    meanwhile; after SIGCONT the late answers are recorded, every sequence table ends empty and the next request
    reading that model gives the same tokens as before the stall."""
    import time

    from logitfusion.actors.coordinator import Coordinator, TextCodec
    from logitfusion.cluster.topology import Limits
    from logitfusion.engine.decoder import GenerationRequest
    from logitfusion.engine.testing import tiny_decode, tiny_encode
    from logitfusion.errors import DeadlineExceeded
    from logitfusion.fusion import presets

    names = ("large", "small", "expert_a")
    actors = {n: start_worker(WorkerSpec(name=n, factory=functools.partial(tiny_runner, n, threaded=False)),
                              num_cpus=0.25, max_restarts=0) for n in names}
    remote: dict[str, RemoteRunner] = {}
    c = None
    try:
        pids = dict(zip(names, ray.get([a.pid.remote() for a in actors.values()], timeout=300)))
        remote = {n: RemoteRunner.for_actor(n, a, reconnect_timeout_s=60) for n, a in actors.items()}
        codec = TextCodec(encode=tiny_encode, decode=tiny_decode, eos_token_ids=())
        c = Coordinator(remote, codec=codec, limits=Limits(max_concurrent_requests=4, max_batch_size=4,
                                                           max_new_tokens=64), stall_timeout_s=0.5)
        proxy, large = presets.proxy_tuning("large", "small", "expert_a"), presets.single("large")

        def req(rid, recipe, n):
            return GenerationRequest(request_id=rid, prompt_ids=tiny_encode("hello"), recipe=recipe,
                                     max_new_tokens=n)

        def run(stream):
            return [t.token_id for chunk in stream for t in chunk.tokens]

        before = run(c.submit(req("before", proxy, 12)))
        alone_ref = run(c.submit(req("alone_ref", large, 40)))
        os.kill(pids["expert_a"], signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            stalled = c.submit(req("stalled", proxy, 12), timeout_s=8.0)
            alone = c.submit(req("alone", large, 40))
            assert run(alone) == alone_ref  # never reads expert_a: not held up
            alone_s = time.monotonic() - t0
            with pytest.raises(DeadlineExceeded, match="request stalled ran longer than its timeout of 8 s"):
                run(stalled)
            ended_s = time.monotonic() - t0
            assert 8.0 <= ended_s < 30.0, ended_s
            assert c.decoder.pending_models() == {"expert_a"}
            print(f"\nstalled worker: the other request finished in {alone_s:.1f} s, the stalled one ended "
                  f"DEADLINE_EXCEEDED after {ended_s:.1f} s (timeout 8 s)")
        finally:
            os.kill(pids["expert_a"], signal.SIGCONT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (c.decoder.pending_models() or c.active_requests()
                                                or any(c.sequences().values())):
            time.sleep(0.1)
        assert c.decoder.pending_models() == frozenset() and c.active_requests() == []
        assert c.sequences() == {n: {} for n in names}  # the late prefill's sequence was released
        assert run(c.submit(req("after", proxy, 12))) == before
    finally:
        if c is not None:
            c.close()
        for r in remote.values():
            r.close()
        for a in actors.values():
            ray.kill(a, no_restart=True)
