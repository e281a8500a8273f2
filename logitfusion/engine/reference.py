"""Reference decoders, one request at a time, straight from the models (no runners, no batching).

- ``naive_decode``: no KV cache at all; every step recomputes every model's logits over the whole sequence. Slow
  and obviously right: the tests' reference for the cached, batched Decoder.
- ``sequential_decode``: what the proxy-tuning reference code does: batch 1, each model called in turn with its
  own Hugging Face ``past_key_values``. The benchmarks' baseline.

Both fuse and sample with logitfusion.fusion as the Decoder does, but on the dense path (every token, never the
certified candidate support) and with the Hugging Face forward, with a generator seeded by ``SamplingParams.seed``,
so a sampled run is reproducible and comparable token for token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from logitfusion.fusion import Recipe, SamplingParams, fuse, make_generator, sample


@dataclass
class ReferenceOutput:
    token_ids: list[int]
    weights: list[list[float]]  # [steps][T] alphas
    finish_reason: str  # "stop" | "length"
    step_logprobs: list[torch.Tensor] = field(default_factory=list)  # per step the fused log-probs [V]


def _prompts(recipe: Recipe, prompt_ids: Sequence[int], model_prompts: Mapping[str, Sequence[int]] | None):
    over = model_prompts or {}
    return {m: [int(t) for t in over.get(m, prompt_ids)] for m in recipe.model_names()}


def _pick(
    logits: Mapping[str, torch.Tensor],
    recipe: Recipe,
    sampling: SamplingParams,
    gen: torch.Generator | None,
    route_weights: torch.Tensor | None = None,
) -> tuple[int, list[float], torch.Tensor]:
    """Fuse one row per model ([1, V] each) and sample: (token, alphas, fused log-probs [V])."""
    res = fuse(logits, recipe, route_weights, support="dense")  # the reference arithmetic on every token
    token = int(sample(res.logprobs, [sampling], [gen])[0])
    return token, [float(a) for a in res.alphas[0]], res.logprobs[0]


@torch.inference_mode()
def naive_decode(
    models: Mapping[str, Any],
    prompt_ids: Sequence[int],
    recipe: Recipe,
    *,
    vocab_size: int,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 16,
    stop_token_ids: Sequence[int] = (),
    model_prompts: Mapping[str, Sequence[int]] | None = None,
    route_weights: torch.Tensor | None = None,
) -> ReferenceOutput:
    """Fused decoding by full recomputation: models[name] is a transformers causal LM; logits sliced to vocab_size.
    route_weights: [1, T], the expert weights of a routed recipe (computed by the caller from the prompt)."""
    sampling = sampling or SamplingParams()
    prompts = _prompts(recipe, prompt_ids, model_prompts)
    gen = make_generator(sampling)
    out = ReferenceOutput([], [], "length")
    for _ in range(max_new_tokens):
        logits = {
            m: models[m](input_ids=torch.tensor([p + out.token_ids])).logits[:, -1, :vocab_size].float()  # [1, V]
            for m, p in prompts.items()
        }
        token, alphas, lp = _pick(logits, recipe, sampling, gen, route_weights)
        out.token_ids.append(token)
        out.weights.append(alphas)
        out.step_logprobs.append(lp)
        if token in stop_token_ids:
            out.finish_reason = "stop"
            break
    return out


@torch.inference_mode()
def sequential_decode(
    models: Mapping[str, Any],
    prompt_ids: Sequence[int],
    recipe: Recipe,
    *,
    vocab_size: int,
    sampling: SamplingParams | None = None,
    max_new_tokens: int = 16,
    stop_token_ids: Sequence[int] = (),
    model_prompts: Mapping[str, Sequence[int]] | None = None,
) -> ReferenceOutput:
    """Fused decoding the proxy-tuning way: batch 1, each model in turn with its own HF KV cache."""
    sampling = sampling or SamplingParams()
    prompts = _prompts(recipe, prompt_ids, model_prompts)
    gen = make_generator(sampling)
    pending = {m: list(p) for m, p in prompts.items()}  # tokens each model has not seen yet
    past: dict[str, Any] = {m: None for m in prompts}
    out = ReferenceOutput([], [], "length")
    for _ in range(max_new_tokens):
        logits = {}
        for m in prompts:
            res = models[m](input_ids=torch.tensor([pending[m]]), past_key_values=past[m], use_cache=True)
            past[m] = res.past_key_values
            logits[m] = res.logits[:, -1, :vocab_size].float()  # [1, V]
        token, alphas, lp = _pick(logits, recipe, sampling, gen)
        out.token_ids.append(token)
        out.weights.append(alphas)
        out.step_logprobs.append(lp)
        if token in stop_token_ids:
            out.finish_reason = "stop"
            break
        pending = {m: [token] for m in prompts}
    return out
