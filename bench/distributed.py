"""A local Ray cluster on loopback for the distributed rows: ModelWorker actors driven by RemoteRunners.

Token authentication stays on (Ray 2.60's default for a local cluster): unless the environment already names a token
or a mode, the process gets one random token in RAY_AUTH_TOKEN, which ``ray.init`` hands to every Ray process it
starts; nothing is written to the home directory. Ray rules of the project: 127.0.0.1 only, small CPU shares per
actor, one torch thread per process.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_CPUS = 0.25  # logical CPU share per model worker
START_TIMEOUT_S = 300.0  # a worker builds or loads its model before it answers


def _ensure_token() -> None:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        logger.warning("RAY_AUTH_MODE=%s set outside the bench: the local cluster runs without token auth", mode)
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class LocalRay:
    """Starts Ray on first use; ``why`` says why it could not."""

    def __init__(self) -> None:
        self.started = False
        self.why = ""
        self._ours = False
        self._actors: dict[str, dict[str, Any]] = {}  # pipeline key -> name -> actor handle
        self._pipelines: dict[str, Pipeline] = {}

    def start(self) -> bool:
        if self.started:
            return True
        if self.why:
            return False
        try:
            import ray

            from logitfusion.actors.remote import RemoteRunner  # noqa: F401 - the actors package must have landed
            from logitfusion.actors.worker import start_worker  # noqa: F401
        except ImportError as exc:
            self.why = f"Ray or logitfusion.actors unavailable: {exc}"
            return False
        try:
            if not ray.is_initialized():
                _ensure_token()
                ray.init(
                    num_cpus=4,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                    runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                              "PYTHONPATH": str(REPO_ROOT)}},
                )
                self._ours = True
        except Exception as exc:  # noqa: BLE001 - any failure to start Ray is a skip with its reason
            self.why = f"ray.init failed: {type(exc).__name__}: {exc}"
            return False
        self.started = True
        return True

    def fail(self, why: str) -> None:
        """Give up on the distributed rows (``start`` answers False from now on) and stop what was started."""
        self.shutdown()
        self.why = why

    def request(self, key: str, specs: Mapping[str, Any]) -> None:
        """Start one ModelWorker per spec (name -> WorkerSpec) without waiting, so several pipelines start at once."""
        from logitfusion.actors.worker import start_worker

        if key not in self._actors:
            self._actors[key] = {n: start_worker(s, num_cpus=WORKER_CPUS, max_restarts=0) for n, s in specs.items()}

    def pipeline(self, key: str, specs: Mapping[str, Any]) -> Pipeline:
        """The pipeline ``key`` (started now if not requested before): every worker constructed, one RemoteRunner
        each. Kept until shutdown, so sections share it."""
        import ray

        from logitfusion.actors.remote import RemoteRunner

        if key in self._pipelines:
            return self._pipelines[key]
        t0 = time.perf_counter()
        self.request(key, specs)
        actors = self._actors[key]
        ray.get([a.pid.remote() for a in actors.values()], timeout=START_TIMEOUT_S)
        pids = dict(zip(actors, ray.get([a.pid.remote() for a in actors.values()], timeout=START_TIMEOUT_S)))
        runners = {name: RemoteRunner.for_actor(name, a, reconnect_timeout_s=60) for name, a in actors.items()}
        logger.info("pipeline %s (%d workers) ready after %.1f s", key, len(actors), time.perf_counter() - t0)
        self._pipelines[key] = Pipeline(actors, runners, pids)
        return self._pipelines[key]

    def shutdown(self) -> None:
        for pipe in self._pipelines.values():
            pipe.close()
        self._pipelines.clear()
        if self.started:
            import ray

            for key, actors in self._actors.items():
                for a in actors.values():
                    ray.kill(a, no_restart=True)
        self._actors.clear()
        if self._ours:
            import ray

            ray.shutdown()
            self._ours = False
        self.started = False


class Pipeline:
    """Workers and their RemoteRunners; ``close`` ends both."""

    def __init__(self, actors: dict[str, Any], runners: dict[str, Any], pids: dict[str, int]) -> None:
        self.actors = actors
        self.runners = runners
        self.pids = pids  # name -> worker process id (same machine: local Ray)

    def cpu_s(self) -> float:
        """CPU seconds so far of this process plus every worker process (NaN where /proc cannot tell)."""
        return time.process_time() + sum(process_cpu_s(pid) for pid in self.pids.values())

    def close(self) -> None:
        """Close the streams (each worker releases the stream's sequences) and stop the workers' servers."""
        import ray

        for r in self.runners.values():
            r.close()
        try:
            ray.get([a.shutdown.remote() for a in self.actors.values()], timeout=30)
        except Exception:  # noqa: BLE001 - the actors are killed by LocalRay.shutdown anyway
            logger.warning("worker shutdown failed", exc_info=True)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a local process, every thread (Linux /proc; NaN elsewhere). 1/CLK_TCK steps."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15 of stat)


def random_specs(names: list[str], sizes: Mapping[str, Any]) -> dict[str, Any]:
    """WorkerSpecs that build the random family's models inside the workers (same seeds: same weights)."""
    from bench.models import random_runner
    from logitfusion.actors.worker import WorkerSpec

    return {n: WorkerSpec(name=n, factory=functools.partial(random_runner, n, sizes[n], threaded=False)) for n in names}


def zoo_specs(names: list[str], zoo: Any) -> dict[str, Any]:
    """WorkerSpecs that load the zoo's checkpoints from disk (models.loading, as a deployment does)."""
    from logitfusion.actors.worker import WorkerSpec

    return {n: WorkerSpec(name=n, model_path=str(zoo.paths.model(n))) for n in names}


def stream_round_trip_s(runner: Any, *, warmup: int, repeats: int) -> list[float]:
    """Seconds of an empty StepPlan's round trip over a RemoteRunner's stream (the worker answers at once)."""
    from logitfusion.engine.runner import StepPlan

    out = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        runner.submit(StepPlan()).result()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out
