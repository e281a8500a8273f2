"""The tensor-parallel group's pure parts: config checks, per-rank environment, bundles, device mapping (no Ray)."""

from __future__ import annotations

import pytest

from logitfusion.actors.tp import TPConfig, shard_bundles, shard_env, shm_segment_path, visible_devices


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tp_size", 0, "tp_size=0 must be in 1..64"),
        ("dtype", "int8", "dtype='int8' must be one of"),
        ("device", "tpu", "device='tpu'"),
        ("num_cpus_per_shard", 0, "num_cpus_per_shard=0"),
        ("max_length_tokens", -1, "max_length_tokens=-1 must be > 0"),
        ("setup_timeout_s", 0, "setup_timeout_s=0 must be > 0"),
        ("name", "", "name must be a non-empty string"),
    ],
)
def test_config_names_the_bad_field(field: str, value: object, message: str) -> None:
    kwargs = {"model_dir": "/m", "name": "large", field: value}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TPConfig(**kwargs)


def test_every_rank_gets_local_size_equal_to_the_world_size() -> None:
    # Without LOCAL_SIZE DeepSpeed's CPU shm all-reduce is called uninitialised and the process dies (SIGSEGV).
    envs = [shard_env(rank, 2, 41234, rank, use_gpu=False) for rank in range(2)]
    assert [e["RANK"] for e in envs] == ["0", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["LOCAL_SIZE"] for e in envs} == {"2"} and {e["WORLD_SIZE"] for e in envs} == {"2"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("127.0.0.1", "41234")}
    assert envs[0]["DS_ACCELERATOR"] == "cpu" and envs[0]["GLOO_SOCKET_IFNAME"] == "lo"
    assert shard_env(0, 2, 1, 0, use_gpu=True)["DS_ACCELERATOR"] == "cuda"


def test_bundles_one_per_shard() -> None:
    assert shard_bundles(2, False, 0.25) == [{"CPU": 0.25}, {"CPU": 0.25}]
    assert shard_bundles(4, True, 1.0) == [{"CPU": 1.0, "GPU": 1}] * 4


def test_visible_devices_union_and_local_ranks() -> None:
    assert visible_devices([[3], [1]]) == ("1,3", [1, 0])
    assert visible_devices([["10"], ["2"]]) == ("2,10", [1, 0])  # numeric order, not string order
    with pytest.raises(RuntimeError, match="share a GPU"):
        visible_devices([[0], [0]])
    with pytest.raises(RuntimeError, match="rank 1 was given GPUs"):
        visible_devices([[0], [1, 2]])


def test_shm_segment_path_follows_deepspeed_naming() -> None:
    path = shm_segment_path("127.0.0.1", 5555, 1, uid=1000)
    assert str(path) == "/dev/shm/deepspeed_allreduce_buffer_1000_127.0.0.1_5555_1"
