"""The README's Ray job path, run as written by a user who never activated the venv.

The commands are read from README.md itself (the `ray start`, `ray job submit` and `cat` lines of the evaluation
section) and run through bash from the repository root with the venv's bin directory removed from PATH, so a bare
`python` or `ray` there would be the system's. Only what a test must change is replaced: the head's ports and temp
dir (appended to `ray start`), the dashboard address, a small config instead of configs/eval.yaml, and an output
directory under the test's tmp dir. The cluster's token comes in RAY_AUTH_TOKEN (nothing is written to ~/.ray).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_evaluate import REPO, _config, _env, _free_port, _stop_head, _wait_for_dashboard  # same directory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

README_ADDRESS = "http://127.0.0.1:8265"
README_CONFIG = "configs/eval.yaml"
README_OUT = '"$PWD/results/eval-job"'


def readme_commands() -> tuple[str, str, str]:
    """(ray start, ray job submit, cat summary) as the README's evaluation section writes them."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Large evaluations as Ray jobs"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[: block.index("```")].replace("\\\n", " ")
    lines = [re.sub(r"\s+", " ", ln).strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    start = next(ln for ln in lines if " ray start " in f" {ln} " or ln.startswith(".venv/bin/ray start"))
    submit = next(ln for ln in lines if "ray job submit" in ln)
    cat = next(ln for ln in lines if ln.startswith("cat ") and "summary" in ln)
    return start, submit, cat


def user_env() -> dict[str, str]:
    """This test's environment without the venv: its bin directory off PATH, no VIRTUAL_ENV."""
    venv_bin = Path(sys.executable).parent.resolve()
    env = _env()
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # the job must find logitfusion in its working dir, as a user's does
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(p).resolve() != venv_bin and not p.endswith("/.venv/bin"))
    return env


def test_readme_commands_are_the_ones_this_test_runs():
    start, submit, cat = readme_commands()
    assert start.startswith(".venv/bin/ray start --head") and "--include-dashboard=true" in start
    assert submit.startswith("RAY_AUTH_MODE=token .venv/bin/ray job submit")
    assert README_ADDRESS in submit and README_CONFIG in submit and README_OUT in submit
    assert '-- "$PWD/.venv/bin/python" -m logitfusion.cluster.evaluate' in submit
    assert cat == "cat results/eval-job/summary.md"


def test_readme_ray_job_submit_works_without_the_venv_activated(tmp_path):
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip(f"the README's path needs the repository's venv at {REPO / '.venv'} (make venv)")
    start, submit, cat = readme_commands()
    env = user_env()
    assert shutil.which("ray", path=env["PATH"]) is None or \
        Path(shutil.which("ray", path=env["PATH"])).parent.resolve() != Path(sys.executable).parent.resolve()
    gcs, dash = _free_port(), _free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="lf-ray-", dir="/tmp"))  # AF_UNIX paths must stay short
    head_cmd = f"{start} --port={gcs} --dashboard-port={dash} --temp-dir={ray_tmp} --num-cpus=2 --block"
    head_log_path = tmp_path / "ray-head.log"
    head_log = open(head_log_path, "wb")  # noqa: SIM115 - a file, not a pipe that could fill up
    head = subprocess.Popen(["bash", "-c", f"exec {head_cmd}"], cwd=REPO, env=env, start_new_session=True,
                            stdout=head_log, stderr=head_log)
    try:
        address = f"http://127.0.0.1:{dash}"
        _wait_for_dashboard(address, head, head_log_path, dict(env, RAY_AUTH_MODE="token"), timeout_s=180)
        out = tmp_path / "eval-job"
        config = _config(tmp_path, datasets=[{"zoo_task": "capital", "limit": 4}], pipelines=1,
                         methods=["large_base", "dlf_newton_multi"])
        job_cmd = (submit.replace(README_ADDRESS, address).replace(README_CONFIG, str(config))
                   .replace(README_OUT, str(out)))
        # Right after `ray start` the dashboard may answer before its job agent has registered; Ray then refuses the
        # submission with "No available agent ... please try again later", which a user simply retries.
        deadline = time.monotonic() + 120
        while True:
            job = subprocess.run(["bash", "-c", job_cmd], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=480)
            logs = job.stdout + job.stderr
            if job.returncode == 0 or "No available agent" not in logs or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, logs[-4000:]
        assert "succeeded" in logs and "ModuleNotFoundError" not in logs, logs[-4000:]
        summary = subprocess.run(["bash", "-c", cat.replace("results/eval-job", str(out))], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=30)
        assert summary.returncode == 0 and "# Evaluation summary" in summary.stdout, summary.stderr
    finally:
        _stop_head(head, head_log, ray_tmp)
