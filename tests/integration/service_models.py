"""Test support for the service tests: tiny random Llama checkpoints on disk, sharing one real tokenizer.

Each model is a Hugging Face directory (config.json, model.safetensors, tokenizer files) that the production
loading path reads like any checkpoint. The tokenizer is a real `tokenizers` character-level tokenizer (one token
per printable ASCII character, plus <pad> <s> </s> <unk>), so text prompts round-trip exactly. Weights are seeded
per model, with a wide initialiser so greedy decoding has no near-ties that batching noise could flip.
"""

from __future__ import annotations

import contextlib
import string
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = tuple(c for c in string.printable if c not in "\t\n\r\x0b\x0c")  # 95 printable characters
SEEDS = {"large": 11, "small": 21, "expert_a": 22, "expert_b": 23, "expert_c": 24}
SHAPES = {  # (hidden, layers, heads, kv heads, intermediate)
    "large": (48, 3, 4, 2, 96),
    "small": (16, 1, 2, 1, 32),
}


def tokenizer(swap: bool = False):
    """The shared tokenizer; swap=True exchanges two tokens' ids (a different vocabulary of the same size)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIALS) + list(CHARS)
    if swap:
        i, j = tokens.index("a"), tokens.index("b")
        tokens[i], tokens[j] = tokens[j], tokens[i]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=2048,
    )


def write_model(path: Path, name: str, *, swap_vocab: bool = False) -> Path:
    """Save one tiny Llama (and the tokenizer) as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(swap=swap_vocab)
    hidden, layers, heads, kv, inter = SHAPES["large" if name == "large" else "small"]
    config = LlamaConfig(
        vocab_size=len(tok) + 5,  # padding rows, as real checkpoints often have
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEEDS.get(name, 99))
        model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_family(root: Path, names=("large", "small", "expert_a", "expert_b")) -> dict[str, Path]:
    return {n: write_model(root / n, n) for n in names}


def topology_dict(root: Path, **limits) -> dict:
    """A topology over the family under ``root`` (relative paths), with every preset kind the tests use."""
    return {
        "models": [
            {"name": "large", "role": "large", "path": "large", "num_cpus": 0.25},
            {"name": "small", "role": "small", "path": "small", "num_cpus": 0.25},
            {"name": "expert_a", "role": "expert", "path": "expert_a", "num_cpus": 0.25},
            {"name": "expert_b", "role": "expert", "path": "expert_b", "num_cpus": 0.25},
        ],
        "presets": {
            "large_base": {"method": "single", "model": "large", "description": "the large base alone"},
            "proxy_a": {"method": "proxy_tuning", "experts": ["expert_a"]},
            "dlf_a": {"method": "dlf", "experts": ["expert_a"], "solver": "newton"},
            "dlf_multi": {"method": "dlf", "experts": ["expert_a", "expert_b"], "solver": "joint"},
        },
        "default_preset": "dlf_multi",
        "limits": {
            "max_concurrent_requests": 12,
            "max_batch_size": 12,
            "max_new_tokens": 1500,
            "default_max_new_tokens": 16,
            "max_prompt_tokens": 128,
            "max_message_bytes": 65536,
            "request_timeout_s": 120,
            **limits,
        },
        "serve": {"grpc_port": 9000, "app_name": "lftest", "coordinator_num_cpus": 0.25, "startup_timeout_s": 300,
                  "reconnect_timeout_s": 60},
    }


def write_topology(root: Path, name: str = "topology.yaml", **limits) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(topology_dict(root, **limits), sort_keys=False))
    return path


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition", *, tolerate_errors: bool = False,
             tick_s: float = 0.05):
    """Poll ``condition()`` until it returns a truthy value and return it; fail naming ``what`` (and the last value)
    after ``timeout_s``. tolerate_errors: an exception counts as "not yet" (a service recovering from a fault answers
    with errors for a while)."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except Exception as exc:  # noqa: BLE001 - re-raised unless the caller expects errors while it waits
            if not tolerate_errors:
                raise
            last = exc
        if last and not isinstance(last, Exception):
            return last
        tick.wait(tick_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def worker_actors(app) -> dict:
    """Model name -> the ModelWorker actor of a running deployment (``app``: its Serve app handle)."""
    import ray

    names = app.workers.remote().result(timeout_s=60)
    return {model: ray.get_actor(name, namespace=ns) for model, (name, ns) in names.items()}


@contextlib.contextmanager
def serving(config: Path) -> Iterator[Any]:
    """A running service over ``config`` for one test module (embedded local Ray unless one already runs, Serve's
    gRPC and HTTP ingresses on free loopback ports); afterwards its application is deleted and Serve, and the Ray
    it started, stopped."""
    import ray
    from ray import serve

    from logitfusion.cluster.cli import free_port, run_service

    started_ray = not ray.is_initialized()
    svc = run_service(config, grpc_port=free_port(), http_port=free_port(), blocking=False, num_cpus=4,
                      access_log=False)
    try:
        yield svc
    finally:
        if started_ray:
            svc.shutdown()
        else:
            serve.delete(svc.app_name, _blocking=True)
            serve.shutdown()
