"""Models for the benchmarks: randomly initialised Llama architectures built from a config (no files, no hub), and
the zoo's trained checkpoints when they are on disk.

Decoding speed does not depend on the weights' values, so random models of a real architecture and size give honest
timings. Every model of a family shares one vocabulary (one fingerprint), so the Decoder accepts them together.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaSize:
    """A Llama architecture; ``seed`` fixes its random weights."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000
    max_length_tokens: int = 4096
    seed: int = 0
    init_range: float = 0.02  # transformers' default for Llama

    def num_parameters(self) -> int:
        """Weights of the model (untied embeddings and head), for memory and bandwidth figures."""
        h, d_kv = self.hidden_size, self.hidden_size // self.num_heads * self.num_kv_heads
        attn = 2 * h * h + 2 * h * d_kv
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attn + mlp + 2 * h) + 2 * self.vocab_size * h + h

    def label(self) -> str:
        return f"{self.num_layers}L x {self.hidden_size} (V={self.vocab_size}, {self.num_parameters() / 1e6:.1f}M)"


# CPU sizes: the large model's forward costs several times the small one's on one core (measured, not assumed:
# the suite reports both forward times).
# Vocabulary 8192: with 32000 the output layer alone would be half of such a tiny small model's work, which real
# small models (TinyLlama: 6%) do not show; the solver section times V = 32000 separately.
CPU_LARGE = LlamaSize(hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=8, intermediate_size=1376,
                      vocab_size=8192, max_length_tokens=1024)
CPU_SMALL = LlamaSize(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=344,
                      vocab_size=8192, max_length_tokens=1024)
# Tiny sizes for the smoke test and --quick.
TINY_LARGE = LlamaSize(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       vocab_size=512, max_length_tokens=512)
TINY_SMALL = LlamaSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                       vocab_size=512, max_length_tokens=512)
# GPU sizes (public configs of real models; vocab 32000 for all).
LLAMA2_7B = LlamaSize(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008)
LLAMA2_13B = LlamaSize(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824)
TINYLLAMA_1B = LlamaSize(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632)


def vocab_fingerprint(vocab_size: int) -> str:
    """The shared fingerprint of a random family's vocabulary."""
    return hashlib.sha256(f"bench-random-vocab:{vocab_size}".encode()).hexdigest()


def family(large: LlamaSize, small: LlamaSize, num_experts: int) -> dict[str, LlamaSize]:
    """large, small and expert_0..T-1 (small-sized), each with its own seed, one vocabulary."""
    if large.vocab_size != small.vocab_size:
        raise ValueError(f"vocab_size differs: large {large.vocab_size}, small {small.vocab_size}")
    sizes = {"large": replace(large, seed=1), "small": replace(small, seed=2)}
    for t in range(num_experts):
        sizes[f"expert_{t}"] = replace(small, seed=10 + t)
    return sizes


def build_llama(size: LlamaSize, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """A randomly initialised LlamaForCausalLM (eval mode) built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_length_tokens,
        initializer_range=size.init_range,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(size.seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def flat_head_copy(model: Any) -> Any:
    """A copy whose output layer is zero: its next-token distribution is uniform whatever the input. Used to make a
    fused target equal to an expert's own distribution (a draft that agrees by construction); same cost per step."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.get_output_embeddings().weight.zero_()
    return clone


def random_runner(name: str, size: LlamaSize, *, threaded: bool = False, dtype: str = "float32",
                  device: str = "cpu", model: Any = None):
    """A LocalRunner over a random Llama (module-level, so a functools.partial of it is a picklable worker factory)."""
    from logitfusion.engine.local import LocalRunner

    if model is None:
        model = build_llama(size, dtype=getattr(torch, dtype), device=device)
    return LocalRunner(
        model,
        name=name,
        vocab_size=size.vocab_size,
        vocab_fingerprint=vocab_fingerprint(size.vocab_size),
        max_length_tokens=size.max_length_tokens,
        threaded=threaded,
    )


# ---------------------------------------------------------------------------------------------------------------- zoo


class Zoo:
    """The zoo's paths and tokenizer, when a built zoo is on disk; each model is loaded once and shared."""

    def __init__(self, paths: Any, tokenizer: Any) -> None:
        self.paths = paths  # logitfusion.models.zoo.build.ZooPaths
        self.tokenizer = tokenizer
        self._loaded: dict[str, Any] = {}  # name -> models.loading.LoadedModel
        self._fingerprint: str | None = None

    def prompts(self, task: str, n: int) -> list[list[int]]:
        """The first ``n`` held-out prompts of ``task``, tokenised (with BOS)."""
        from logitfusion.models.zoo.tasks import eval_items

        return [list(self.tokenizer.encode(it.prompt)) for it in eval_items(task, limit=n)]

    def loaded(self, name: str) -> Any:
        """The zoo model ``name`` (models.loading.LoadedModel), loaded on first use."""
        from logitfusion.models.loading import load_model

        if name not in self._loaded:
            self._loaded[name] = load_model(self.paths.model(name), name=name)
        return self._loaded[name]

    def runner(self, name: str, *, threaded: bool = False):
        """A fresh LocalRunner (empty caches) over the zoo model ``name``."""
        from logitfusion.engine.local import LocalRunner, tokenizer_fingerprint

        m = self.loaded(name)
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(m.tokenizer)
        return LocalRunner(m.model, name=name, vocab_size=m.vocab_size, vocab_fingerprint=self._fingerprint,
                           max_length_tokens=m.max_length_tokens, threaded=threaded)

    def runners(self, names: list[str] | tuple[str, ...], *, threaded: bool = False) -> dict[str, Any]:
        return {n: self.runner(n, threaded=threaded) for n in names}

    @property
    def vocab_size(self) -> int:
        return self.loaded("large").vocab_size


def find_zoo(cache_dir: str | None = None) -> tuple[Zoo | None, str]:
    """(the zoo, "") when one is built (committed, or in the cache ``cache_dir`` / the default), else (None, why)."""
    try:
        from logitfusion.models.zoo.build import load_zoo

        paths = load_zoo(cache_dir)
    except Exception as exc:  # noqa: BLE001 - ZooNotBuilt, or the zoo package not landed yet: a skip, not a crash
        return None, f"{type(exc).__name__}: {exc}"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths.large), local_files_only=True)
    return Zoo(paths, tok), ""


class RandomFamily:
    """The random family of one suite run, built once: name -> model, all on the CPU in fp32."""

    def __init__(self, large: LlamaSize, small: LlamaSize, num_experts: int) -> None:
        self.sizes = family(large, small, num_experts)
        self.models = {name: build_llama(size) for name, size in self.sizes.items()}
        self.vocab_size = large.vocab_size
        self.experts = [n for n in self.sizes if n.startswith("expert_")]

    def runners(self, names: list[str] | tuple[str, ...], *, threaded: bool = False) -> dict[str, Any]:
        """Fresh LocalRunners (empty caches) over the family's models."""
        return {n: random_runner(n, self.sizes[n], threaded=threaded, model=self.models[n]) for n in names}


def close_runners(runners: dict[str, Any]) -> None:
    for r in runners.values():
        r.close()
