"""The evaluation job: resumable after a kill, failures and timeouts recorded, and submitted with `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from logitfusion.cluster.evaluate import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_TIMEOUT,
    EvalConfig,
    EvalPipeline,
    _model_dirs,
    make_units,
    read_done,
)

REPO = Path(__file__).resolve().parents[2]
STABLE = ("key", "status", "output", "correct", "weights", "experts", "message")

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, **over) -> Path:
    cfg = {
        "datasets": [{"zoo_task": "capital", "limit": 6}, {"zoo_task": "animal", "limit": 4}],
        "methods": ["large_base", "large_finetuned", "static_multi", "dlf_newton_multi"],
        "pipelines": 2,
        "pipeline_num_cpus": 0.25,
        "batch_size": 4,
        "chunk_size": 4,
        "plot_examples": 2,
    }
    cfg.update(over)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _run(config: Path, out: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "logitfusion.cluster.evaluate", "--config", str(config), "--output-dir", str(out),
           "--no-progress"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), start_new_session=True, **kw)


def _stable(records: dict[str, dict]) -> dict[str, tuple]:
    return {k: tuple(json.dumps(r[f], sort_keys=True) for f in STABLE) for k, r in records.items()}


def _complete_lines(path: Path) -> int:
    """Newline-terminated lines of a file another process is appending to (read only)."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _complete_lines(path) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the evaluation exited early with code {proc.returncode}")
        time.sleep(0.2)  # polling a file another process writes; not a synchronisation between our threads
    pytest.fail(f"{path} did not reach {n} lines within {timeout_s} s")


@pytest.mark.timeout(600)
def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path):
    config = _config(tmp_path)
    units = make_units(EvalConfig.load(config))
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    assert _run(config, full).wait(timeout=300) == 0
    want = read_done(full / "results.jsonl")
    assert sorted(want) == sorted(u.key for u in units)

    proc = _run(config, resumed)
    _wait_for_lines(resumed / "results.jsonl", 4, proc, timeout_s=300)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait(timeout=30)
    partial = read_done(resumed / "results.jsonl")
    assert 0 < len(partial) < len(units), "the kill must land mid-run for this test to mean anything"

    assert _run(config, resumed).wait(timeout=300) == 0
    lines = [json.loads(x) for x in (resumed / "results.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in lines]
    assert len(keys) == len(set(keys)), "a unit was written twice"
    assert _stable(read_done(resumed / "results.jsonl")) == _stable(want)

    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"][STATUS_OK] == len(units)
    assert summary["rows"] == json.loads((full / "summary.json").read_text())["rows"]
    assert (resumed / "summary.md").read_text().startswith("# Evaluation summary")
    assert (resumed / "weights.png").stat().st_size > 1000


@pytest.mark.timeout(600)
def test_a_job_evaluates_routed_multi_without_a_task_label(tmp_path):
    config = _config(tmp_path, datasets=[{"zoo_task": "colour", "limit": 4}, {"zoo_task": "animal", "limit": 3}],
                     methods=["large_base", "large_finetuned", "routed_multi"], pipelines=1)
    out = tmp_path / "out"
    assert _run(config, out).wait(timeout=300) == 0
    done = read_done(out / "results.jsonl")
    routed = {k: r for k, r in done.items() if r["method"] == "routed_multi"}
    assert len(routed) == 7 and all(r["status"] == STATUS_OK for r in routed.values())
    colour = [r for r in routed.values() if r["dataset"] == "colour"]
    assert all(r["correct"] == 1.0 for r in colour)  # each routed to the colour expert by its prompt alone
    assert all(w[1] > 0 and w[0] == w[2] == w[3] == 0 for r in colour for w in r["weights"][:1])
    for r in (r for r in routed.values() if r["dataset"] == "animal"):
        base = done[r["key"].replace("/routed_multi/", "/large_base/")]
        assert r["output"] == base["output"] and all(x == 0 for w in r["weights"] for x in w)  # routed to none
    rows = {(r["task"], r["method"]): r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows[("colour", "routed_multi")]["accuracy"] == 1.0


def test_failing_and_slow_items_are_recorded_not_fatal(tmp_path):
    cfg = EvalConfig.load(_config(tmp_path, methods=["large_base", "dlf_newton_multi"]))
    units = make_units(cfg)[:4]
    too_long = units[0].__class__(**{**units[0].__dict__, "key": "capital/large_base/huge", "prompt": "x " * 100_000})
    pipe = EvalPipeline(_model_dirs(cfg, units, None), batch_size=4, item_timeout_s=120)
    results = pipe.run([too_long, *units])
    assert [r.key for r in results] == [too_long.key, *(u.key for u in units)]
    assert results[0].status == STATUS_ERROR and "length" in results[0].message.lower()
    assert all(r.status == STATUS_OK for r in results[1:])

    slow = EvalPipeline(_model_dirs(cfg, units, None), batch_size=4, item_timeout_s=1e-6)
    timed = slow.run(units)
    assert {r.status for r in timed} == {STATUS_TIMEOUT}
    assert "item_timeout_s" in timed[0].message


def test_bad_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"datasets": [{"zoo_task": "capital"}], "pipelinez": 2}))
    with pytest.raises(ValueError, match="pipelinez"):
        EvalConfig.load(bad)
    wrong = _config(tmp_path, methods=["expert"], datasets=[{"zoo_task": "animal"}])
    with pytest.raises(ValueError, match="'expert' does not apply to task 'animal'"):
        make_units(EvalConfig.load(wrong))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_ray_job_submit_against_a_head(tmp_path):
    """`ray start --head` on loopback, the `ray` CLI answering with the cluster's token, a job submitted with
    JobSubmissionClient, stopped mid-run, submitted again, and resumed to the end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}  # noqa: N806 - a constant of this test

    # The head and the CLI share one token and state the mode: a CLI process that never ran ray.init() would
    # otherwise stay in Ray's default "disabled" mode and be refused by the head (which turned token auth on).
    env = dict(_env(), RAY_AUTH_MODE="token")
    gcs, dash = _free_port(), _free_port()
    # Ray's plasma socket lives under the temp dir and AF_UNIX paths stop at 107 bytes: pytest's tmp_path is too deep.
    ray_tmp = Path(tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp"))
    ray_bin = str(Path(sys.executable).parent / "ray")
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--temp-dir={ray_tmp}", "--disable-usage-stats"]
    # --block keeps the head in the foreground of its own session, so the test stops exactly this cluster (never
    # `ray stop`, which would stop every Ray cluster on the machine).
    head_log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 - a file, not a pipe that could fill up
    head = subprocess.Popen([*start, "--block"], env=env, start_new_session=True, stdout=head_log, stderr=head_log)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(address, head, tmp_path / "ray-head.log", env, timeout_s=180)
        out = tmp_path / "job-out"
        config = _config(tmp_path, datasets=[{"zoo_task": "capital", "limit": 16}], pipelines=1)
        n_units = 16 * 4
        # The SDK client sends the cluster's token as a bearer header of its own: this process's Ray config may be in
        # either auth mode (depending on which tests ran before), and an explicit Authorization header is always used.
        client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})

        def submit() -> str:
            # right after `ray start` the head may answer before its job agent registers ("No available agent to
            # submit job, please try again later"): retried, bounded, as the README tells users to
            deadline = time.monotonic() + 120
            while True:
                try:
                    return client.submit_job(
                        entrypoint=f"{sys.executable} -m logitfusion.cluster.evaluate --config {config} "
                        f"--output-dir {out} --no-progress",
                        runtime_env={"working_dir": str(REPO), "excludes": ["/.venv", "/results", "*.pyc"],
                                     # a job that sets a thread variable itself: the entrypoint must not collide
                                     "env_vars": {"OMP_NUM_THREADS": "1"}},
                    )
                except RuntimeError as exc:
                    if "No available agent" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(2)

        def wait(job: str, until: Callable[[], bool] = lambda: False) -> JobStatus:
            deadline = time.monotonic() + 480
            status = client.get_job_status(job)
            while status not in TERMINAL and not until() and time.monotonic() < deadline:
                time.sleep(0.2)  # polling the job's status over HTTP
                status = client.get_job_status(job)
            return status

        # 1. stopped mid-run (`ray job stop`): what it wrote stays
        first = submit()
        results = out / "results.jsonl"
        wait(first, until=lambda: _complete_lines(results) >= 4)  # read only: read_done would cut a torn line
        client.stop_job(first)
        assert wait(first) == JobStatus.STOPPED, client.get_job_logs(first)[-3000:]
        partial = read_done(results)
        assert 0 < len(partial) < n_units, "the stop must land mid-run for this test to mean anything"

        # 2. the same job submitted again resumes: nothing lost, nothing run twice
        second = submit()
        status = wait(second)
        logs = client.get_job_logs(second)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert f"{n_units} units, {len(partial)} already done" in logs
        keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == n_units, "a unit was lost or written twice"
        assert all(read_done(results)[k] == rec for k, rec in partial.items())  # earlier results kept as they were
        summary = json.loads((out / "summary.json").read_text())
        assert summary["units"] == n_units and summary["status"][STATUS_OK] == n_units
        assert "# Evaluation summary" in logs
    finally:
        _stop_head(head, head_log, ray_tmp)


def _wait_for_dashboard(address: str, head: subprocess.Popen, log_path: Path, env: dict, timeout_s: float) -> None:
    """Return once `ray job list` answers at ``address`` with the token (the dashboard starts after `ray start`)."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}: {log_path.read_text()[-2000:]}")
        probe = subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True,
                               text=True, timeout=120)
        if probe.returncode == 0:
            return
        last = (probe.stdout + probe.stderr)[-1000:]
        time.sleep(1.0)  # polling the head's HTTP endpoint
    pytest.fail(f"the Ray head's dashboard at {address} did not answer within {timeout_s} s: {last}")


def _stop_head(head: subprocess.Popen, head_log: Any, ray_tmp: Path) -> None:
    """Stop a `ray start --block` head (SIGTERM to its process group, SIGKILL after 60 s), close its log, remove
    its temp dir."""
    _kill_group(head, signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_group(head, signal.SIGKILL)
        head.wait(timeout=30)
    head_log.close()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group `proc` leads; it may already be gone (a head that failed to start exits by itself)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


