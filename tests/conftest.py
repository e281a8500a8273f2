"""Process-wide test settings, applied before any test module imports Ray or torch.

Ray 2.60 turns token authentication on by itself for a new local cluster and caches the token in the driver for the
life of the process: a second cluster started by the same pytest process must use the same token, and setting
RAY_AUTH_MODE by hand after `import ray` breaks `ray.init()`. So the suite hands Ray ONE random token through
RAY_AUTH_TOKEN here, before anything else runs, and leaves RAY_AUTH_MODE to Ray: authentication stays on, every
cluster of the run (and every subprocess, which inherits the variable) uses the same token, and nothing is written
to ~/.ray.
"""

import os
import secrets

os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per process (2 cores; more ran 7x slower)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_sessionfinish(session, exitstatus):
    """Remove the shared-memory files (actors/shm.py) of worker processes the tests killed: a SIGKILLed worker
    cannot unlink its own; a later worker on the machine would sweep them, the suite does not leave that to it."""
    from logitfusion.actors import shm

    shm.sweep_stale()
