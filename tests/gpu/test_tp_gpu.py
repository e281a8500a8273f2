"""Tensor parallelism on GPUs: a Llama sharded over 2 GPU actors (NCCL + DeepSpeed AutoTP) against the same model on
one GPU. Skipped unless this machine has at least 2 CUDA devices.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA devices"),
]

ATOL = 1e-3  # fp32 on GPUs: the sharded sums reorder additions and cuBLAS picks its own kernels


def _model_dir(root: Path) -> Path:
    """A small random Llama (fixed seed) with a real tokenizer, in the Hugging Face layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(1020)]  # V = 1024
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(4321)
    model = LlamaForCausalLM(config)
    out = root / "llama-gpu"
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # token auth on, nothing written to ~/.ray
    ray.init(
        num_cpus=4,
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.timeout(900)
def test_tp2_on_gpus_matches_one_gpu(ray_gpu, tmp_path_factory: pytest.TempPathFactory) -> None:
    from logitfusion.actors.tp import TensorParallelRunner, TPConfig
    from logitfusion.engine.local import LocalRunner
    from logitfusion.engine.runner import ExtendOp, StepPlan

    model_dir = _model_dir(tmp_path_factory.mktemp("tpgpu"))
    reference = LocalRunner.from_pretrained(model_dir, "large", device="cuda:0", threaded=False)
    runner = TensorParallelRunner(TPConfig(model_dir=str(model_dir), name="large", tp_size=2, device="cuda"))
    try:
        assert runner.use_gpu and runner.describe().device.startswith("cuda")
        g = torch.Generator().manual_seed(0)
        prompt = tuple(torch.randint(4, 1024, (16,), generator=g).tolist())
        plans = [StepPlan(extends=(ExtendOp("a", prompt, "all"), ExtendOp("b", prompt[:9])))]
        plans += [StepPlan(extends=(ExtendOp("a", (10 + i,)), ExtendOp("b", (20 + i,)))) for i in range(4)]
        for plan in plans:
            got, want = runner.step(plan), reference.step(plan)
            worst = max(float((x - y).abs().max()) for x, y in zip(got, want))
            assert worst <= ATOL, f"max abs logits difference {worst:.3g} > {ATOL}"
        runner.step(StepPlan(releases=("a", "b")))
        reference.step(StepPlan(releases=("a", "b")))

        def greedy(r) -> list[int]:
            out, plan = [], StepPlan(extends=(ExtendOp("g", prompt),))
            for _ in range(16):
                out.append(int(r.step(plan)[0][-1].argmax()))
                plan = StepPlan(extends=(ExtendOp("g", (out[-1],)),))
            r.step(StepPlan(releases=("g",)))
            return out

        assert greedy(runner) == greedy(reference)
    finally:
        pg = runner.placement_group
        runner.close()
        reference.close()
    assert ray_gpu.util.placement_group_table(pg)["state"] == "REMOVED"
