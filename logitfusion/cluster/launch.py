"""Starting a fusion pipeline on Ray: a ModelWorker actor per model, a RemoteRunner per worker, the Coordinator.

``Pipeline.launch`` is what a Serve replica of cluster.serve_app runs in its constructor (the replica's placement
group holds the pipeline: bundle 0 the Coordinator, bundles 1.. the workers); outside a replica it reserves a
placement group of its own. ``deployment_options`` sizes that replica's group for Serve. Before any weights load,
every model's tokenizer is checked to be the same vocabulary (``check_vocabularies``), so a mismatch fails in
seconds with the two models named. Every start-up failure is a ConfigError naming the model or the setting.

The frontend (request conversion, FusionService, health, drain) is cluster.serve_app; this module starts things.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util import get_current_placement_group, remove_placement_group
from ray.util import placement_group as make_pg

from logitfusion.actors.coordinator import Coordinator, TextCodec
from logitfusion.actors.remote import RemoteRunner
from logitfusion.actors.worker import WorkerSpec, start_worker
from logitfusion.cluster.topology import Topology
from logitfusion.errors import ConfigError, FusionError
from logitfusion.models.vocab import VocabularyMismatch
from logitfusion.models.vocab import check_vocabularies as check_same_vocabulary

ONGOING_HEADROOM = 16  # Serve may run this many more calls than max_concurrent_requests (health, Describe, ...)


def load_tokenizer(path: Path) -> Any:
    """The tokenizer of a local HF model dir (or a .gguf file / a dir holding one). Never the network."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def check_vocabularies(topology: Topology) -> Any:
    """Every model's tokenizer must be the same vocabulary; returns the shared tokenizer.

    Raises ConfigError naming the two models and the first difference (models.vocab.check_vocabularies).
    """
    toks = {}
    for m in topology.models:
        path = topology.model_path(m.name)
        try:
            toks[m.name] = load_tokenizer(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"models[{m.name}].path: cannot load a tokenizer from {path}: {exc}") from None
    try:
        check_same_vocabulary(toks)
    except VocabularyMismatch as exc:
        raise ConfigError(f"models: {exc}") from None
    return toks[topology.models[0].name]


@dataclass
class Pipeline:
    """One fusion pipeline: a ModelWorker actor per model, a RemoteRunner per worker, and the Coordinator."""

    topology: Topology
    workers: dict[str, Any]  # model name -> ModelWorker actor handle
    worker_names: dict[str, str]  # model name -> Ray actor name (namespace: the replica's)
    coordinator: Coordinator
    placement_group: Any = None  # owned by this pipeline (None when it runs in a Serve replica's group)
    runners: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def launch(cls, topology: Topology, *, name_prefix: str, placement_group: Any = None) -> Pipeline:
        """Start the workers (in the current placement group's bundles 1.. when inside a Serve replica, else in a
        placement group of our own), connect, check vocabularies, start the Coordinator."""
        tokenizer = check_vocabularies(topology)  # fail in seconds, before any weights load
        codec = TextCodec.from_tokenizer(tokenizer)
        gpus = ray.cluster_resources().get("GPU", 0.0)
        owned = None
        pg, offset = placement_group, 1
        if pg is None:
            pg = get_current_placement_group()
        if pg is None:  # not in a Serve replica: reserve the model bundles ourselves (this process coordinates)
            wanted = topology.placement_bundles(gpus)[1:]
            owned = pg = make_pg(wanted, strategy=topology.serve.placement_strategy)
            offset = 0
            if not pg.wait(timeout_seconds=topology.serve.startup_timeout_s):
                remove_placement_group(pg)
                raise ConfigError(
                    f"placement: the bundles {wanted} could not be reserved within serve.startup_timeout_s "
                    f"({topology.serve.startup_timeout_s} s); the cluster has {ray.cluster_resources()}"
                )
        workers: dict[str, Any] = {}
        names: dict[str, str] = {}
        runners: dict[str, Any] = {}
        try:
            for i, m in enumerate(topology.models):
                names[m.name] = f"{name_prefix}:{m.name}"
                workers[m.name] = launch_worker(topology, m.name, names[m.name], pg, offset + i, gpus)
            wait_for_workers(workers, topology.serve.startup_timeout_s)  # every model loads in parallel
            for name, actor in workers.items():
                runners[name] = RemoteRunner.for_actor(
                    name, actor, reconnect_timeout_s=topology.serve.reconnect_timeout_s, tls=topology.worker_tls()
                )
            coordinator = Coordinator(runners, codec=codec, limits=topology.limits, name=name_prefix,
                                      fusion_device=topology.serve.fusion_device,
                                      stall_timeout_s=topology.serve.stall_timeout_s)
        except BaseException as exc:
            for r in runners.values():
                r.close()
            for a in workers.values():
                ray.kill(a, no_restart=True)
            if owned is not None:
                remove_placement_group(owned)
            if isinstance(exc, ValueError) and not isinstance(exc, FusionError):
                raise ConfigError(str(exc)) from None  # e.g. the Decoder's vocabulary check naming the models
            raise
        return cls(topology, workers, names, coordinator, owned, runners)

    def close(self) -> None:
        """Fail running requests, close the streams (workers release them), stop the workers. Idempotent."""
        self.coordinator.close()
        for r in self.runners.values():
            r.close()
        for a in self.workers.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.workers = {}
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None


def wait_for_workers(workers: Mapping[str, Any], timeout_s: float) -> None:
    """Block until every worker actor has loaded its model and serves (its constructor returned).

    Raises ConfigError naming the models that failed to start (with the cause) or did not start in time.
    """
    pending = {actor.address.remote(): name for name, actor in workers.items()}
    deadline = time.monotonic() + timeout_s
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise ConfigError(
                f"models {sorted(pending.values())} did not start within serve.startup_timeout_s ({timeout_s} s)"
            )
        name = pending.pop(done[0])
        try:
            ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - the worker's constructor failed: say which model and why
            raise ConfigError(f"models[{name}]: the worker failed to start: {exc}") from None


def launch_worker(
    topology: Topology, model: str, actor_name: str, placement_group: Any, bundle_index: int, gpus_available: float
) -> Any:
    """One ModelWorker actor for ``model`` in its bundle (Ray restarts it up to max_restarts times when it dies)."""
    m = topology.model(model)
    path = topology.model_path(m.name)
    gguf = path.name if path.is_file() and path.suffix.lower() == ".gguf" else None
    spec = WorkerSpec(
        name=m.name,
        model_path=str(path.parent if gguf else path),
        gguf_file=gguf,
        dtype=m.dtype,
        tp_size=m.tp_size,
        bind_host=topology.serve.worker_bind_host,
        tls=topology.worker_tls(),
    )
    return start_worker(
        spec,
        num_cpus=m.driver_num_cpus if m.tp_size > 1 else m.num_cpus,
        num_gpus=0.0 if m.tp_size > 1 else topology.model_shard_gpus(m.name, gpus_available),  # tp: shards
        max_restarts=m.max_restarts,
        placement_group=placement_group,
        bundle_index=bundle_index,
        name=actor_name,
    )


def deployment_options(topology: Topology, gpus_available: float) -> dict[str, Any]:
    """Serve options of the deployment: the pipeline's placement group per replica, and admission headroom."""
    limits = topology.limits
    return {
        "num_replicas": topology.serve.replicas,
        "ray_actor_options": {"num_cpus": topology.serve.coordinator_num_cpus,
                              "num_gpus": topology.coordinator_gpus(gpus_available)},
        "placement_group_bundles": topology.placement_bundles(gpus_available),
        "placement_group_strategy": topology.serve.placement_strategy,
        # The Coordinator refuses request max_concurrent_requests + 1 itself (RESOURCE_EXHAUSTED, at once); Serve
        # must let that request through to the replica instead of queueing it, hence the headroom.
        "max_ongoing_requests": limits.max_concurrent_requests + ONGOING_HEADROOM,
        "max_queued_requests": limits.max_concurrent_requests + ONGOING_HEADROOM,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
        # Serve's own wait for calls in flight when a replica stops; our drain ends them within drain_timeout_s.
        "graceful_shutdown_timeout_s": max(20.0, topology.serve.drain_timeout_s + 10.0),
    }
