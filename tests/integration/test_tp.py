"""Tensor parallelism on the CPU: a Llama sharded over 2 Ray actors (gloo + DeepSpeed AutoTP) must compute what the
unsharded model computes, step for step, and leave nothing behind when closed.

The model is the zoo's "large" model when it has been built, otherwise a tiny random Llama with the zoo's shape
habits (tied embeddings, config vocabulary padded above the tokenizer's). Ray runs locally on loopback with token
authentication on, the token held in this process's environment (nothing is written to ~/.ray).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from logitfusion.actors.tp import TensorParallelRunner, TPConfig, release_group, shm_segment_path
from logitfusion.engine.local import LocalRunner
from logitfusion.engine.runner import ExtendOp, RunnerError, RunnerUnavailable, StepPlan
from logitfusion.fusion import SamplingParams, presets

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.integration]

logger = logging.getLogger(__name__)
ZOO_DATA = Path(__file__).resolve().parents[2] / "logitfusion" / "models" / "zoo" / "data"
ATOL = 1e-4  # fp32; the sharded sums only reorder additions (measured 2e-6..6e-6 on the tiny model)


def _tokenizer():
    """A real tokenizers WordLevel tokenizer: 4 specials and 96 words (V = 100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(96)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_llama(out: Path, *, hidden: int, heads: int, kv_heads: int, seed: int) -> Path:
    """A tiny random Llama (fixed seed) with the zoo's habits: tied embeddings, config vocabulary padded above V."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden * 5 // 2,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-default weights so that logits differ visibly between tokens
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out


def _zoo_models() -> dict[str, Path] | None:
    """large, small and one expert from the committed zoo, when it has been built."""
    experts = sorted(ZOO_DATA.glob("expert_*/config.json"))
    if not ((ZOO_DATA / "large" / "config.json").exists() and (ZOO_DATA / "small" / "config.json").exists()):
        return None
    if not experts:
        return None
    return {"large": ZOO_DATA / "large", "small": ZOO_DATA / "small", "expert": experts[0].parent}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    zoo = _zoo_models()
    if zoo is not None:
        return zoo
    root = tmp_path_factory.mktemp("tp")
    return {
        "large": _tiny_llama(root / "large", hidden=64, heads=4, kv_heads=2, seed=1234),
        "small": _tiny_llama(root / "small", hidden=32, heads=2, kv_heads=2, seed=5),
        "expert": _tiny_llama(root / "expert", hidden=32, heads=2, kv_heads=2, seed=6),
    }


@pytest.fixture(scope="module")
def model_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["large"]


def _local(path: Path, name: str) -> LocalRunner:
    return LocalRunner.from_pretrained(path, name, threaded=False)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LocalRunner:
    """The unsharded model in this process."""
    torch.set_num_threads(1)
    runner = _local(model_dir, "large")
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def tp2(ray_local, model_dir: Path) -> TensorParallelRunner:
    runner = TensorParallelRunner(TPConfig(model_dir=str(model_dir), name="large", tp_size=2, device="cpu"))
    yield runner
    runner.close()


def _ids(runner, n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(4, runner.describe().vocab_size, (n,), generator=g).tolist())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if [t.shape for t in a] != [t.shape for t in b]:
        raise AssertionError(f"shapes differ: {[t.shape for t in a]} vs {[t.shape for t in b]}")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.timeout(600)
def test_tp2_logits_match_unsharded_model(tp2: TensorParallelRunner, reference: LocalRunner) -> None:
    info, ref_info = tp2.describe(), reference.describe()
    assert (info.vocab_size, info.vocab_fingerprint) == (ref_info.vocab_size, ref_info.vocab_fingerprint)
    assert info.num_parameters == ref_info.num_parameters  # the whole model's count, not one shard's
    a, b = _ids(reference, 7, 0), _ids(reference, 12, 1)
    plans = [  # prefill of two sequences of different lengths, one wanting every position
        StepPlan(extends=(ExtendOp("a", a, "all"), ExtendOp("b", b))),
    ]
    for step in range(5):  # cached decode steps, batched
        plans.append(StepPlan(extends=(ExtendOp("a", (10 + step,)), ExtendOp("b", (20 + step,)))))
    plans += [
        StepPlan(extends=(ExtendOp("b", (5, 6, 7), "all"),), truncates=(("a", 4),)),  # a speculative verify
        StepPlan(extends=(ExtendOp("a", (8,)), ExtendOp("c", _ids(reference, 3, 2)))),  # after a rollback
        StepPlan(releases=("b",), extends=(ExtendOp("a", (9,)), ExtendOp("c", (11,)))),
    ]
    diffs = []
    for plan in plans:
        got, want = tp2.step(plan), reference.step(plan)
        diffs.append(_max_diff(got, want))
        assert all(t.dtype == torch.float32 and t.shape[-1] == info.vocab_size for t in got)
    logger.info("tp=2 vs unsharded: max abs logits difference per step %s", [f"{d:.2e}" for d in diffs])
    assert max(diffs) <= ATOL, f"max abs logits difference per step {diffs} exceeds {ATOL}"
    assert tp2.sequences() == reference.sequences() == {"a": 6, "c": 4}
    tp2.step(StepPlan(releases=("a", "c")))
    reference.step(StepPlan(releases=("a", "c")))
    assert tp2.sequences() == {}


def _greedy(runner, prompt: tuple[int, ...], steps: int) -> list[int]:
    out: list[int] = []
    plan = StepPlan(extends=(ExtendOp("g", prompt),))
    for _ in range(steps):
        token = int(runner.step(plan)[0][-1].argmax())
        out.append(token)
        plan = StepPlan(extends=(ExtendOp("g", (token,)),))
    runner.step(StepPlan(releases=("g",)))
    return out


@pytest.mark.timeout(600)
def test_tp2_greedy_generation_is_identical(tp2: TensorParallelRunner, reference: LocalRunner) -> None:
    prompt = _ids(reference, 6, 3)
    want = _greedy(reference, prompt, 24)
    assert len(set(want)) > 1  # the reference does not collapse onto one token, so a match means something
    assert _greedy(tp2, prompt, 24) == want


def _fused_generation(large, dirs: dict[str, Path]) -> list[list[int]]:
    """Proxy-tuning (large + (expert - small)), greedy, two requests batched, through the Decoder."""
    from logitfusion.engine.decoder import Decoder, GenerationRequest

    small, expert = _local(dirs["small"], "small"), _local(dirs["expert"], "expert")
    try:
        decoder = Decoder({"large": large, "small": small, "expert": expert}, max_batch_size=4)
        recipe = presets.proxy_tuning("large", "small", "expert", alpha=1.0)
        requests = [
            GenerationRequest(
                request_id=f"r{i}",
                prompt_ids=_ids(small, 5 + 4 * i, 10 + i),
                recipe=recipe,
                sampling=SamplingParams(temperature=0.0),
                max_new_tokens=20,
                stop_token_ids=(),
            )
            for i in range(2)
        ]
        results = decoder.generate(requests)
        assert large.sequences() == {}  # the Decoder released every sequence it opened
        return [r.token_ids for r in results]
    finally:
        small.close()
        expert.close()


@pytest.mark.timeout(600)
def test_tp2_fused_generation_through_the_decoder_is_identical(
    tp2: TensorParallelRunner, reference: LocalRunner, model_dirs: dict[str, Path]
) -> None:
    want = _fused_generation(reference, model_dirs)
    assert all(len(t) == 20 for t in want) and want[0] != want[1]
    assert _fused_generation(tp2, model_dirs) == want


@pytest.mark.timeout(600)
def test_bad_plan_is_refused_by_every_rank_and_the_group_goes_on(tp2: TensorParallelRunner) -> None:
    vocab = tp2.describe().vocab_size
    with pytest.raises(RunnerError, match="outside"):
        tp2.step(StepPlan(extends=(ExtendOp("x", (1, vocab + 5)),)))
    with pytest.raises(RunnerError, match="unknown seq_id"):
        tp2.step(StepPlan(truncates=(("nobody", 0),)))
    assert tp2.sequences() == {}
    assert tp2.step(StepPlan(extends=(ExtendOp("x", (1, 2)),)))[0].shape == (1, vocab)
    tp2.step(StepPlan(releases=("x",)))


def _pg_state(pg) -> str:
    return ray.util.placement_group_table(pg)["state"]


@pytest.mark.timeout(600)
def test_close_removes_shards_placement_group_and_shm(ray_local, model_dir: Path) -> None:
    runner = TensorParallelRunner(TPConfig(model_dir=str(model_dir), name="large", tp_size=2, device="cpu"))
    pg, shards = runner.placement_group, runner.shards
    assert _pg_state(pg) == "CREATED" and len(shards) == 2
    assert ray.util.placement_group_table(pg)["strategy"] == "STRICT_PACK"
    segments = [shm_segment_path("127.0.0.1", runner.master_port, rank) for rank in range(2)]
    assert not any(p.exists() for p in segments)  # unlinked once every rank had mapped them
    assert not list(Path("/dev/shm").glob(f"*_{runner.master_port}_*"))  # under whatever name DeepSpeed used
    assert runner.step(StepPlan(extends=(ExtendOp("s", (1, 2, 3)),)))[0].shape[0] == 1
    runner.close()
    runner.close()  # idempotent
    assert _pg_state(pg) == "REMOVED"
    for shard in shards:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(shard.sequences.remote(), timeout=60)
    assert runner.sequences() == {}
    with pytest.raises(RunnerUnavailable, match="closed"):
        runner.step(StepPlan(extends=(ExtendOp("s", (1,)),)))
    assert not any(p.exists() for p in segments)


@pytest.mark.timeout(600)
def test_a_dead_rank_makes_the_runner_unavailable_and_close_still_cleans_up(ray_local, model_dir: Path) -> None:
    runner = TensorParallelRunner(TPConfig(model_dir=str(model_dir), name="large", tp_size=2, device="cpu"))
    pg = runner.placement_group
    ray.kill(runner.shards[1], no_restart=True)
    with pytest.raises(RunnerUnavailable, match="rank 1"):
        runner.step(StepPlan(extends=(ExtendOp("s", (1, 2, 3)),)))
    with pytest.raises(RunnerUnavailable, match="rank 1"):  # broken for good: no second plan reaches rank 0
        runner.step(StepPlan(extends=(ExtendOp("t", (1,)),)))
    runner.close()
    assert _pg_state(pg) == "REMOVED"


def _groups_named(model: str) -> list[str]:
    """States of every placement group a TensorParallelRunner made for ``model``."""
    groups = [(pg["name"], pg["state"]) for pg in ray.util.placement_group_table().values()]
    return [state for name, state in groups if name.startswith("logitfusion-tp:") and name.endswith(f":{model}")]


@pytest.mark.timeout(600)
def test_an_architecture_autotp_cannot_shard_is_refused_and_nothing_is_left(
    ray_local, tmp_path: Path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64)).save_pretrained(gpt2)
    _tokenizer().save_pretrained(gpt2)
    segments_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    with pytest.raises(RunnerUnavailable, match="AutoTP not supported"):
        TensorParallelRunner(TPConfig(model_dir=str(gpt2), name="gpt2", tp_size=2, device="cpu"))
    assert set(_groups_named("gpt2")) == {"REMOVED"}
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= segments_before  # ~66 MiB each
    with pytest.raises(RunnerUnavailable, match="nowhere"):
        TensorParallelRunner(TPConfig(model_dir=str(tmp_path / "nowhere"), name="missing", tp_size=2, device="cpu"))
    assert set(_groups_named("missing")) == {"REMOVED"}


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds (Ray's wait_for_condition pattern), failing with ``what`` after timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def _actor_dead(handle) -> bool:
    try:
        ray.get(handle.sequences.remote(), timeout=10)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        return False
    return False


def _host_class():
    """What a ModelWorker does with a tensor-parallel model: build the runner in its own process and step it.

    Defined inside a function so that Ray ships the class by value (workers cannot import test modules).
    """

    class Host:
        def __init__(self, model_dir: str) -> None:
            self.runner = TensorParallelRunner(TPConfig(model_dir=model_dir, name="large", tp_size=2, device="cpu"))

        def step(self, plan: StepPlan):
            return self.runner.step(plan)

        def group(self):
            return self.runner.placement_group, self.runner.shards

    return Host


@pytest.mark.timeout(600)
def test_a_worker_actor_hosts_the_group_and_a_restart_frees_the_old_group(
    ray_local, model_dir: Path, reference: LocalRunner
) -> None:
    logger.info("starting host")
    host = ray.remote(num_cpus=0.1, max_restarts=1, max_task_retries=2)(_host_class()).remote(str(model_dir))
    plan = StepPlan(extends=(ExtendOp("h", _ids(reference, 5, 7), "all"),))
    want = reference.step(plan)
    reference.step(StepPlan(releases=("h",)))
    assert _max_diff(ray.get(host.step.remote(plan), timeout=300), want) <= ATOL
    pg, shards = ray.get(host.group.remote(), timeout=60)
    assert _pg_state(pg) == "CREATED"
    logger.info("host up; crashing it")

    ray.kill(host, no_restart=False)  # the worker crashes; Ray restarts it and it rebuilds its group
    assert _max_diff(ray.get(host.step.remote(plan), timeout=300), want) <= ATOL
    new_pg, new_shards = ray.get(host.group.remote(), timeout=60)
    logger.info("host restarted")
    assert new_pg.id != pg.id and _pg_state(new_pg) == "CREATED"
    assert _pg_state(pg) == "REMOVED"  # the crashed incarnation's group does not hold its CPUs/GPUs any more
    assert all(_actor_dead(s) for s in shards)  # shards die with the process that owned them
    logger.info("old shards dead")

    owner = host._actor_id.hex()
    ray.kill(host, no_restart=True)  # now for good: the group stays until someone releases it
    _wait_until(lambda: all(_actor_dead(s) for s in new_shards), 60, "the dead host's shards are gone")
    assert _pg_state(new_pg) == "CREATED"
    logger.info("host dead for good")
    assert release_group(owner, "large") is True
    _wait_until(lambda: _pg_state(new_pg) == "REMOVED", 60, "the released group is removed")
