"""ModelWorker actors on a real local Ray (loopback, small CPU shares) driven by RemoteRunner over gRPC.

The worker process is killed in the middle of a greedy generation; Ray restarts it on a new port, the RemoteRunner
asks the actor for the new address, replays the sequence's history and the generation completes token-identical to
an uninterrupted run in this process.

Token authentication (Ray 2.60 turns it on by default for a local ``ray.init()``): this module gives the process
one random token in ``RAY_AUTH_TOKEN`` and leaves ``RAY_AUTH_MODE`` to Ray, so ``ray.init()`` switches token mode
on itself, takes the token from the environment (nothing is written to ~/.ray) and hands both to every Ray process
it starts. The token is set once per test process and never changed or removed: Ray caches it in the driver, so a
second cluster in the same process with another token fails to start ("Failed to start GCS", InvalidAuthToken).
"""

from __future__ import annotations

import functools
import os
import secrets
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


def _ensure_ray_token() -> None:
    """One random token for every Ray cluster this process starts (see the module docstring)."""
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@pytest.fixture(scope="module")
def ray_local():
    if ray.is_initialized():
        yield
        return
    _ensure_ray_token()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


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
