"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on loopback (small CPU shares fit several actors on 2 cores), one torch thread per worker.

    Token authentication stays on: Ray 2.60 switches it on for a new local cluster and takes the token tests/conftest.py
    put in RAY_AUTH_TOKEN (one per pytest process, inherited by every Ray process, never written to ~/.ray). A cluster
    some earlier module left running is reused as it is.
    """
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        yield
        return
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        yield
    finally:
        ray.shutdown()
