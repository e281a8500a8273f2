"""Tensor parallelism: one large model sharded over a group of Ray actors with DeepSpeed AutoTP.

Shape of a group (tp_size = N):
- N ``TPShard`` actors, one per rank, in a STRICT_PACK placement group (one bundle per shard: ``{"CPU": c}`` on
  the CPU, ``{"GPU": 1, "CPU": c}`` on GPUs), so every rank of a group lives on one node.
- Every rank joins one ``torch.distributed`` group ("gloo" on the CPU, "nccl" on GPUs), loads the full model from
  a local Hugging Face directory and hands it to ``deepspeed.init_inference(tensor_parallel={"tp_size": N})``,
  which slices the attention and MLP weights (AutoTP; the architecture must be one AutoTP knows, e.g. Llama).
- Each rank wraps its sharded module in a ``LocalRunner`` (the same per-sequence KV caches and batching as an
  unsharded model; each rank caches only its own heads). The forward contains collectives, so every rank must run
  the SAME plan in the SAME order: ``TensorParallelRunner.submit`` sends each StepPlan to all ranks at once (Ray
  keeps one caller's calls to an actor in order) and answers with rank 0's logits; the other ranks return nothing.

Who serves the worker stream: ``TensorParallelRunner`` is an ordinary ``ModelRunner``. The ModelWorker process
that owns the worker.proto stream for a large model builds one instead of a LocalRunner when tp_size > 1, so that
process drives the group and rank 0's logits flow out through its stream. The shards themselves serve nothing.

Rendezvous and ports (loopback only, nothing listens on a wildcard address): ranks meet through a FileStore in a
temporary directory on the group's node (STRICT_PACK makes that directory shared), gloo binds the loopback device.
MASTER_ADDR / MASTER_PORT are still set because DeepSpeed's CPU shared-memory all-reduce names its segments after
them; rank 0 keeps the chosen port bound (never listening) while the group lives so no other group on the node
can pick the same name.

DeepSpeed's CPU all-reduce (seen with 0.19.8): it uses a shared-memory kernel when LOCAL_SIZE equals the world
size; without LOCAL_SIZE the kernel is still called but was never initialised, and the process dies with SIGSEGV.
So every rank gets LOCAL_RANK and LOCAL_SIZE. The kernel's segments (/dev/shm/deepspeed_allreduce_buffer_*, about
66 MiB per rank) are never unlinked by DeepSpeed; each rank unlinks its own once every rank has mapped them, so a
killed group leaks nothing. The kernel spins while it waits for its peers (a rank whose peer died keeps one core
busy until it is killed, which close() does).

Other DeepSpeed facts worth knowing (0.19.8): ``import deepspeed`` takes about 3 s; the first group on a machine
JIT-compiles the shm op (about 40 s on 2 cores, then cached under ~/.cache/torch_extensions or
TORCH_EXTENSIONS_DIR); DS_ACCELERATOR is set explicitly so DeepSpeed does not guess (and warn); AutoTP refuses
architectures it does not know (GPT-2: "AutoTP not supported for model"), which setup reports as RunnerUnavailable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch

from logitfusion.engine.runner import (
    ModelRunner,
    RunnerError,
    RunnerInfo,
    RunnerUnavailable,
    StepPlan,
    failed,
)
from logitfusion.models.loading import DTYPES

logger = logging.getLogger(__name__)

DeviceKind = Literal["auto", "cpu", "cuda"]
_live_groups: set[str] = set()  # placement-group names of the runners alive in this process
_live_lock = threading.Lock()
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"  # DeepSpeed's SHM_BUFFER_NAME (csrc/cpu/comm/shm.cpp)


# ----------------------------------------------------------------------------------------------------------------
# Configuration and pure helpers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TPConfig:
    """How to build one tensor-parallel group."""

    model_dir: str  # a local Hugging Face directory (config.json, weights, tokenizer files)
    name: str  # the model's name in the topology (RunnerInfo.name)
    tp_size: int = 2  # number of shards (ranks); heads and hidden size must divide by it
    dtype: str = "float32"  # one of DTYPES
    device: DeviceKind = "auto"  # "auto": GPUs when the cluster has at least tp_size of them, else the CPU
    num_cpus_per_shard: float = 0.25  # Ray CPU share of each shard's bundle
    max_length_tokens: int | None = None  # default: the model's max_position_embeddings
    placement_timeout_s: float = 60.0  # how long to wait for the placement group's resources
    setup_timeout_s: float = 600.0  # loading + sharding (the first run also JIT-builds DeepSpeed's shm op)
    collective_timeout_s: float = 300.0  # torch.distributed timeout of one collective
    call_timeout_s: float = 60.0  # sequences() and close() calls to the shards

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must be a non-empty string")
        if not 1 <= self.tp_size <= 64:
            raise ValueError(f"tp_size={self.tp_size} must be in 1..64")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {sorted(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if not 0 < self.num_cpus_per_shard <= 64:
            raise ValueError(f"num_cpus_per_shard={self.num_cpus_per_shard} must be in (0, 64]")
        if self.max_length_tokens is not None and self.max_length_tokens <= 0:
            raise ValueError(f"max_length_tokens={self.max_length_tokens} must be > 0")
        for field in ("placement_timeout_s", "setup_timeout_s", "collective_timeout_s", "call_timeout_s"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}={getattr(self, field)} must be > 0")


def shard_bundles(tp_size: int, use_gpu: bool, num_cpus_per_shard: float) -> list[dict[str, float]]:
    """One placement-group bundle per shard."""
    bundle: dict[str, float] = {"CPU": num_cpus_per_shard}
    if use_gpu:
        bundle["GPU"] = 1
    return [dict(bundle) for _ in range(tp_size)]


def shard_env(rank: int, world_size: int, master_port: int, local_rank: int, use_gpu: bool) -> dict[str, str]:
    """The environment one rank needs before torch.distributed and DeepSpeed start.

    LOCAL_SIZE is not optional on the CPU: DeepSpeed's shared-memory all-reduce is initialised only when it equals
    the world size, and is called regardless (SIGSEGV without it). All ranks of a group share one node.
    """
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_SIZE": str(world_size),
        "GLOO_SOCKET_IFNAME": "lo",
        "NCCL_SOCKET_IFNAME": "lo",
        "DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
        "OMP_NUM_THREADS": "1",
    }


def shm_segment_path(master_addr: str, master_port: int, rank: int, uid: int | None = None) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps rank's shared-memory segment."""
    uid = os.getuid() if uid is None else uid
    return Path("/dev/shm") / f"{SHM_BUFFER_PREFIX}_{uid}_{master_addr}_{master_port}_{rank}"


def visible_devices(gpu_ids_per_rank: Sequence[Sequence[int | str]]) -> tuple[str, list[int]]:
    """CUDA_VISIBLE_DEVICES shared by the group and each rank's index into it (its LOCAL_RANK).

    Ray gives every GPU actor only its own device; NCCL peer-to-peer wants every rank to see every device of the
    group, so each rank sees the union and picks its own device by position.
    """
    own: list[str] = []
    for rank, ids in enumerate(gpu_ids_per_rank):
        if len(ids) != 1:
            raise RuntimeError(f"tensor-parallel rank {rank} was given GPUs {list(ids)}; expected exactly one")
        own.append(str(ids[0]))
    union = sorted(set(own), key=lambda s: (len(s), s))
    if len(union) != len(own):
        raise RuntimeError(f"tensor-parallel ranks share a GPU: {own}")
    return ",".join(union), [union.index(g) for g in own]


def _reserve_port() -> socket.socket:
    """A loopback port, bound (never listening) so that no other group on this node picks the same one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def group_name(owner: str, model: str) -> str:
    """The placement group name of ``model``'s shards when built by ``owner`` (a Ray actor id, or a driver tag)."""
    return f"logitfusion-tp:{owner}:{model}"


def release_group(owner: str, model: str) -> bool:
    """Remove the shards' placement group of a host that died for good; True if there was one.

    Ray kills the shard actors with the actor that created them, but NOT the placement group it created (seen with
    Ray 2.60: it stays CREATED, its CPUs/GPUs reserved, until the job ends). A host that is restarted cleans its
    previous group itself (TensorParallelRunner removes a group of the same name first); a supervisor calls this
    for a host that will not come back.
    """
    from ray.util.placement_group import get_placement_group, remove_placement_group

    try:
        pg = get_placement_group(group_name(owner, model))
    except ValueError:
        return False
    remove_placement_group(pg)
    return True


def _load(model_dir: str, dtype: str) -> tuple[Any, int, str, int]:
    """The unsharded model on the CPU (DeepSpeed moves each shard to its device), the tokenizer's real vocabulary
    size V, its fingerprint and the model's maximum length in tokens."""
    from logitfusion.engine.local import tokenizer_fingerprint
    from logitfusion.models.loading import load_model

    loaded = load_model(model_dir, dtype=dtype, device="cpu")
    return loaded.model, loaded.vocab_size, tokenizer_fingerprint(loaded.tokenizer), loaded.max_length_tokens


# ----------------------------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSetup:
    """What every rank needs to join its group (sent by the TensorParallelRunner)."""

    config: TPConfig
    rank: int
    master_port: int
    store_path: str  # FileStore path on the group's node
    use_gpu: bool
    cuda_visible_devices: str = ""  # GPUs only: the group's devices
    local_rank: int = -1  # GPUs only: this rank's index in cuda_visible_devices; the CPU uses rank


class TPShard:
    """One rank of a tensor-parallel group: a DeepSpeed-sharded model behind a LocalRunner.

    Hosted as a Ray actor (``ray.remote(TPShard)``); every method runs on the actor's one thread, in call order.
    """

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self._runner = None
        self._rank = -1
        self._port_sock: socket.socket | None = None
        self._store_dir: str | None = None

    # ---------------------------------------------------------------------------------------------- rank 0 only

    def reserve(self) -> tuple[int, str, str]:
        """Rank 0: reserve the group's port and create the rendezvous directory; (port, store path, node id)."""
        import ray

        self._port_sock = _reserve_port()
        self._store_dir = tempfile.mkdtemp(prefix="logitfusion-tp-")
        node = ray.get_runtime_context().get_node_id()
        return self._port_sock.getsockname()[1], os.path.join(self._store_dir, "store"), node

    # ---------------------------------------------------------------------------------------------- every rank

    def gpu_ids(self) -> list[int | str]:
        import ray

        return list(ray.get_gpu_ids())

    def setup(self, setup: ShardSetup) -> RunnerInfo:
        """Join the group, load and shard the model. Blocks until every rank of the group has called it."""
        import torch.distributed as dist

        cfg = setup.config
        local_rank = setup.local_rank if setup.use_gpu else setup.rank
        os.environ.update(shard_env(setup.rank, cfg.tp_size, setup.master_port, local_rank, setup.use_gpu))
        if setup.use_gpu:
            os.environ["CUDA_VISIBLE_DEVICES"] = setup.cuda_visible_devices
            torch.cuda.set_device(local_rank)
        torch.set_num_threads(1)
        self._rank = setup.rank
        store = dist.FileStore(setup.store_path, cfg.tp_size)
        dist.init_process_group(
            "nccl" if setup.use_gpu else "gloo",
            store=store,
            rank=setup.rank,
            world_size=cfg.tp_size,
            timeout=timedelta(seconds=cfg.collective_timeout_s),
        )
        import deepspeed

        from logitfusion.engine.local import LocalRunner

        model, vocab_size, fingerprint, max_length = _load(cfg.model_dir, cfg.dtype)
        num_parameters = sum(p.numel() for p in model.parameters())
        try:
            engine = deepspeed.init_inference(
                model,
                tensor_parallel={"tp_size": cfg.tp_size},
                dtype=DTYPES[cfg.dtype],
                replace_with_kernel_inject=False,
            )
            dist.barrier()  # every rank has mapped every shm segment: each may now unlink its own
        finally:  # on failure too (e.g. an architecture AutoTP refuses): the group is about to be killed
            shm_segment_path("127.0.0.1", setup.master_port, setup.rank).unlink(missing_ok=True)
        self._runner = LocalRunner(
            engine.module,
            name=cfg.name,
            vocab_size=vocab_size,
            vocab_fingerprint=fingerprint,
            max_length_tokens=cfg.max_length_tokens or max_length,
            backend="hf",  # the shard's forward is DeepSpeed's sharded one (its all-reduces), never the lean one
            threaded=False,
        )
        info = dataclasses.replace(self._runner.describe(), num_parameters=num_parameters)
        logger.info("tp rank %d/%d of %s ready on %s", setup.rank, cfg.tp_size, cfg.name, info.device)
        return info

    def step(self, plan: StepPlan) -> list[torch.Tensor] | None:
        """Run one plan (every rank, in lockstep); rank 0 returns the logits, the others None."""
        if self._runner is None:
            raise RunnerUnavailable("tensor-parallel shard is not set up")
        out = self._runner.step(plan)
        return out if self._rank == 0 else None

    def sequences(self) -> dict[str, int]:
        return {} if self._runner is None else self._runner.sequences()

    def close(self) -> None:
        """Free the caches and leave the process group."""
        import torch.distributed as dist

        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._port_sock is not None:
            self._port_sock.close()
            self._port_sock = None
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------


def _cause(exc: BaseException) -> BaseException:
    """The exception raised inside an actor, unwrapped from Ray's RayTaskError."""
    return getattr(exc, "cause", None) or exc


class TensorParallelRunner(ModelRunner):
    """A ModelRunner whose model is sharded over ``config.tp_size`` TPShard actors (see the module docstring).

    Needs a connected Ray (``ray.init`` done). ``placement``: an existing placement group and the bundle index of
    each rank, for callers that reserve a pipeline's resources themselves; its bundles must share a node
    (STRICT_PACK) and the group stays theirs. Without it the runner creates and, on close, removes its own, named
    ``group_name(owner, config.name)`` where owner is the hosting actor's id (stable across Ray restarts).

    Hosting: a ModelWorker actor builds this runner when its model has tp_size > 1 and serves the worker stream with
    it; the shard actors are owned by that worker and die with it. Their placement group does not (Ray 2.60), so a
    restarted worker removes its predecessor's group by name on start, and ``release_group(owner, name)`` frees
    the group of a worker that will not be restarted.
    """

    def __init__(self, config: TPConfig, *, placement: tuple[Any, Sequence[int]] | None = None) -> None:
        import ray

        if not ray.is_initialized():
            raise RunnerUnavailable("TensorParallelRunner needs a connected Ray: call ray.init() first")
        self.config = config
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None
        self._shards: list[Any] = []
        self._owns_pg = placement is None
        self.master_port = 0
        self._node_id: str | None = None  # the node of the group (all ranks: STRICT_PACK)
        self.use_gpu = self._want_gpu(config)
        # A restarted host actor keeps its id: the name finds the group its previous incarnation left behind.
        self.owner = ray.get_runtime_context().get_actor_id() or f"driver-{uuid.uuid4().hex[:12]}"
        self.group_name = group_name(self.owner, config.name)
        with _live_lock:
            if self.group_name in _live_groups:
                raise ValueError(f"this process already hosts a tensor-parallel group for model {config.name!r}")
            _live_groups.add(self.group_name)
        self._pg: Any = None
        try:
            indices = self._reserve(placement)
            self._shards = self._start_shards(indices)
            self._info = self._setup(ray)
        except BaseException as exc:
            self._broken = f"{config.name}: setup failed: {exc!r}"  # ranks may be stuck in a collective: kill
            self.close()
            raise
        logger.info(
            "tensor-parallel %s up: tp_size=%d on %s, %d parameters",
            config.name,
            config.tp_size,
            "GPUs" if self.use_gpu else "the CPU",
            self._info.num_parameters,
        )

    def _reserve(self, placement: tuple[Any, Sequence[int]] | None) -> list[int]:
        """Create (or adopt) the placement group and wait for its resources; the bundle index of each rank."""
        import ray
        from ray.util.placement_group import placement_group

        cfg = self.config
        bundle = shard_bundles(1, self.use_gpu, cfg.num_cpus_per_shard)[0]
        if placement is None:
            if release_group(self.owner, cfg.name):
                logger.warning("%s: removed the shard group a previous incarnation of this host left", cfg.name)
            bundles = shard_bundles(cfg.tp_size, self.use_gpu, cfg.num_cpus_per_shard)
            self._pg = placement_group(bundles, strategy="STRICT_PACK", name=self.group_name)
            indices = list(range(cfg.tp_size))
        else:
            self._pg, indices = placement[0], list(placement[1])
            if len(indices) != cfg.tp_size:
                raise ValueError(f"placement names {len(indices)} bundles; tp_size={cfg.tp_size} needs one each")
        try:
            ray.get(self._pg.ready(), timeout=cfg.placement_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise RunnerUnavailable(
                f"{cfg.name}: no node could hold {cfg.tp_size} shard bundles {bundle} together (STRICT_PACK) "
                f"within placement_timeout_s={cfg.placement_timeout_s}"
            ) from exc
        return indices

    def _start_shards(self, indices: Sequence[int]) -> list[Any]:
        """One TPShard actor per rank, rank r in bundle indices[r]."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.config
        actor_cls = ray.remote(TPShard)
        return [
            actor_cls.options(
                num_cpus=cfg.num_cpus_per_shard,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=index
                ),
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
            ).remote()
            for index in indices
        ]

    @staticmethod
    def _want_gpu(config: TPConfig) -> bool:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        if config.device == "cuda" and gpus < config.tp_size:
            raise RunnerUnavailable(
                f"{config.name}: device='cuda' with tp_size={config.tp_size} but the Ray cluster has {gpus} GPUs"
            )
        return config.device == "cuda" or (config.device == "auto" and gpus >= config.tp_size)

    def _setup(self, ray: Any) -> RunnerInfo:
        cfg = self.config
        port, store_path, self._node_id = ray.get(self._shards[0].reserve.remote(), timeout=cfg.call_timeout_s)
        self.master_port = port  # names the group's DeepSpeed shm segments on its node
        devices, local_ranks = "", [-1] * cfg.tp_size
        if self.use_gpu:
            gpu_ids = ray.get([s.gpu_ids.remote() for s in self._shards], timeout=cfg.call_timeout_s)
            devices, local_ranks = visible_devices(gpu_ids)
        setups = [
            ShardSetup(cfg, rank, port, store_path, self.use_gpu, devices, local_ranks[rank])
            for rank in range(cfg.tp_size)
        ]
        refs = [shard.setup.remote(s) for shard, s in zip(self._shards, setups)]
        try:
            infos = ray.get(refs, timeout=cfg.setup_timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise RunnerUnavailable(
                f"{cfg.name}: tensor-parallel setup took longer than setup_timeout_s={cfg.setup_timeout_s}"
            ) from exc
        except ray.exceptions.RayError as exc:
            raise RunnerUnavailable(f"{cfg.name}: tensor-parallel setup failed: {_cause(exc)!r}") from exc
        return infos[0]

    # ------------------------------------------------------------------------------------------------ contract

    def describe(self) -> RunnerInfo:
        return self._info

    def submit(self, plan: StepPlan) -> Future:
        """Send the plan to every rank at once; resolves to rank 0's logits when every rank is done."""
        with self._lock:
            if self._closed:
                return failed(RunnerUnavailable(f"runner {self.config.name!r} is closed"))
            if self._broken is not None:
                return failed(RunnerUnavailable(self._broken))
            rank_futures = [shard.step.remote(plan).future() for shard in self._shards]
        return self._gather(rank_futures)

    def _gather(self, rank_futures: list[Future]) -> Future:
        """One future for the whole group: rank 0's result once every rank is done; a dead rank fails it at once."""
        out: Future = Future()
        pending = [len(rank_futures)]
        lock = threading.Lock()

        def on_done(rank: int, fut: Future) -> None:
            exc = fut.exception()
            if exc is not None and not isinstance(_cause(exc), RunnerError):
                self._mark_broken(f"{self.config.name}: tensor-parallel rank {rank} failed: {_cause(exc)!r}")
            with lock:
                pending[0] -= 1
                if out.done():
                    return
                if self._broken is not None:
                    out.set_exception(RunnerUnavailable(self._broken))
                    return
                if pending[0] > 0:
                    return
                errors = [f.exception() for f in rank_futures]
                if all(e is None for e in errors):
                    out.set_result(rank_futures[0].result())
                elif all(e is not None for e in errors):
                    out.set_exception(RunnerError(str(_cause(errors[0]))))  # every rank refused the plan alike
                else:
                    # identical ranks disagreed about one plan: their caches can no longer be trusted
                    self._mark_broken(f"{self.config.name}: tensor-parallel ranks diverged on one plan")
                    out.set_exception(RunnerUnavailable(str(self._broken)))

        for rank, fut in enumerate(rank_futures):
            fut.add_done_callback(lambda f, r=rank: on_done(r, f))
        return out

    def _mark_broken(self, why: str) -> None:
        with self._lock:
            if self._broken is None:
                self._broken = why
                logger.error("%s", why)

    def sequences(self) -> dict[str, int]:
        import ray

        if self._closed or not self._shards:
            return {}
        try:
            return ray.get(self._shards[0].sequences.remote(), timeout=self.config.call_timeout_s)
        except ray.exceptions.RayError as exc:
            raise RunnerUnavailable(f"{self.config.name}: rank 0 did not answer: {_cause(exc)!r}") from exc

    def close(self) -> None:
        """Leave the group gracefully when it is healthy, then kill the shards and free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, []
        if shards and self._broken is None:
            try:
                ray.get([s.close.remote() for s in shards], timeout=self.config.call_timeout_s)
            except ray.exceptions.RayError as exc:  # a dead or stuck rank: killing below frees it anyway
                logger.warning("%s: graceful close failed: %r", self.config.name, _cause(exc))
        for shard in shards:
            ray.kill(shard, no_restart=True)
        if self.master_port and self._node_id == ray.get_runtime_context().get_node_id():
            # a rank killed between creating its shm segment and unlinking it would leave ~66 MiB behind
            for rank in range(self.config.tp_size):
                shm_segment_path("127.0.0.1", self.master_port, rank).unlink(missing_ok=True)
        if self._owns_pg and self._pg is not None:
            remove_placement_group(self._pg)
        with _live_lock:
            _live_groups.discard(self.group_name)

    @property
    def placement_group(self) -> Any:
        """The placement group holding the shards (for tests and the topology's bookkeeping)."""
        return self._pg

    @property
    def shards(self) -> list[Any]:
        """The shard actor handles, rank order (empty after close)."""
        return list(self._shards)
