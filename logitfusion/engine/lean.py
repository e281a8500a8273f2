"""A lean decode forward for Llama-family checkpoints: the model's own weights, a slot KV cache, no framework.

Why: on the models fusion serves next to each other the Hugging Face forward spends most of a decode step in Python
(cache objects, mask builders, output dataclasses), not in arithmetic: on the zoo's large model 1.25 ms a step
against 0.67 ms here (this machine, batch 1). Fused decoding runs three or more models per token, so that overhead
decides the service's speed. This module runs the arithmetic of ``LlamaForCausalLM`` (the same weights, RMSNorm,
the model's own rotary table, SDPA) over a preallocated cache:

    cache[layer]: keys, values [S, H_kv, L_cap, D]   S sequence slots, L_cap positions (both grow by doubling)

A sequence owns one slot; its cached length is all the state it has, so a truncate is free and a release just
returns the slot. One forward takes rows that each append tokens at their own position: the new keys and values
are written at [slot, :, start:start + n] and every row attends to its own first start + i + 1 positions (a boolean
mask when rows differ, SDPA's causal fast path when they cannot). Rows that append different numbers of tokens
(prefills of different prompts) share one forward, right-padded. q/k/v and gate/up run as one matmul each, on
weights stored [in, out] once (the module's own parameters become views of them); in fp32 the rotation is one
complex product on the (x_i, x_{i + D/2}) pairs, with q and k kept pair-major, which no q . k product can tell.

What it serves: ``llama``, and ``mistral`` / ``qwen2`` without sliding windows, with plain nn.Linear projections of
the config's shapes and rotary types whose table does not depend on the sequence length. ``unsupported_reason``
says why anything else is refused; the runner then falls back to the Hugging Face forward. ``LeanLlama.self_check``
compares both forwards once at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


MODEL_TYPES = ("llama", "mistral", "qwen2")
# Rotary types whose cos/sin at a position never change with the sequence length (so one table serves every step).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SELF_CHECK_TOKENS = 8
SELF_CHECK_ATOL = 1e-3  # fp32 logits of the two forwards differ by ~1e-6; a real mismatch is orders larger


def unsupported_reason(model: Any) -> str | None:
    """None when ``LeanLlama`` can run ``model``, else why not (for the log line of the fallback)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {MODEL_TYPES}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"sliding_window={config.sliding_window} is not supported"
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope_type {rope_type!r} depends on the sequence length"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "rotary_emb", None) is None or getattr(model, "lm_head", None) is None:
        return "the module tree is not model.layers / model.rotary_emb / lm_head"
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"layer {i} has no q/k/v/o projections"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"layer {i} normalises queries/keys (not Llama attention)"
        if not all(hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} has no gated MLP"
        projections = {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        projections.update({n: getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")})
        for n, m in projections.items():
            if type(m) is not torch.nn.Linear:  # a sharded (tensor-parallel) or quantized layer computes otherwise
                return f"layer {i} {n} is {type(m).__name__}, not torch.nn.Linear (sharded or quantized)"
        head_dim = int(getattr(attn, "head_dim", 0) or 0)
        if (projections["q_proj"].weight.shape[0] != heads * head_dim
                or projections["k_proj"].weight.shape[0] != kv_heads * head_dim):
            return f"layer {i} q/k projections do not match {heads}/{kv_heads} heads of {head_dim} (sharded?)"
    param = next(model.parameters())
    if param.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {param.dtype} is not a float type the cache supports"
    return None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, scale in the model dtype. [..., h] -> [..., h]"""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel for pow, mean, rsqrt and both scalings
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding. x: [B, H, n, D]; cos, sin: [B, 1, n, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _fused_weight(linears: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several linears of the same input as one matmul: the weight transposed once to [in, sum out] (contiguous;
    ``x @ w`` skips the per-call transpose that F.linear's [out, in] layout costs, half of a small matmul's time on
    the CPU) and the biases, if any, concatenated. The modules' own parameters are rebound to views of it, so the
    lean forward costs no extra memory and the model still runs on its own."""
    weight_t = torch.cat([m.weight.detach() for m in linears]).t().contiguous()  # [in, sum out]
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else weight_t.new_zeros(m.weight.shape[0]) for m, b in zip(linears, biases)]
    )
    col = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight_t[:, col : col + n].t(), requires_grad=False)  # [out, in] view
        if m.bias is not None:
            m.bias = torch.nn.Parameter(bias[col : col + n], requires_grad=False)
        col += n
    return weight_t, bias


def _mm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight_t [in, out] (+ bias) -> [..., out]"""
    y = torch.matmul(x, weight_t)
    return y if bias is None else y + bias


class _Layer:
    """One decoder layer's weights, looked up once (attribute walks cost microseconds per step), with q/k/v and
    gate/up fused into one matmul each and every weight stored [in, out]."""

    __slots__ = ("ln1", "eps1", "qkv", "o", "ln2", "eps2", "gate_up", "inter", "down")

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.ln1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.qkv = _fused_weight((attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = _fused_weight((attn.o_proj,))
        self.inter = mlp.gate_proj.weight.shape[0]
        self.gate_up = _fused_weight((mlp.gate_proj, mlp.up_proj))
        self.down = _fused_weight((mlp.down_proj,))


class LeanLlama:
    """The forward of a Llama-family ``model`` over a slot KV cache. Not thread-safe: one caller at a time.

    max_length_tokens: the longest sequence a slot holds. The cache starts at ``initial_slots`` x
    ``initial_length_tokens`` and doubles in either dimension when a step needs more.
    """

    def __init__(
        self,
        model: Any,
        max_length_tokens: int,
        *,
        initial_slots: int = 4,
        initial_length_tokens: int = 128,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanLlama cannot run this model: {reason}")
        config = model.config
        inner = model.model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        attn0 = inner.layers[0].self_attn
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(attn0.head_dim)
        self.scaling = float(attn0.scaling)
        self.groups = self.num_heads // self.num_kv_heads
        self.max_length_tokens = int(max_length_tokens)
        self._embed = inner.embed_tokens.weight  # [V_cfg, h]
        self._layers = [_Layer(layer) for layer in inner.layers]
        self._norm, self._norm_eps = inner.norm.weight, inner.norm.variance_epsilon
        head = model.lm_head
        if head.weight.data_ptr() == self._embed.data_ptr():  # tied to the embedding, which must stay [V, h] rows
            self._head_t = (head.weight.t(), head.bias)  # a transposed view: no copy
        else:
            self._head_t = _fused_weight((head,))
        # cos/sin per position from the model's own rotary module: elementwise, so a table equals per-step calls
        with torch.inference_mode():
            pos = torch.arange(self.max_length_tokens, device=self.device).unsqueeze(0)  # [1, L]
            cos, sin = inner.rotary_emb(self._embed[:1].unsqueeze(0), pos)  # [1, L, D]
        self._cos, self._sin = cos[0], sin[0]  # [L, D]
        # fp32: the rotation as one complex product on (x_i, x_{i + D/2}) pairs, which is what rotate_half pairs
        half = self.head_dim // 2
        self._rot = torch.complex(self._cos[:, :half].float(), self._sin[:, :half].float())  # [L, D/2]
        self._complex_rope = self.dtype == torch.float32
        self._slots = 0
        self._length_cap = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._grow(max(1, initial_slots), min(self.max_length_tokens, max(1, initial_length_tokens)))

    # ------------------------------------------------------------------------------------------------ cache

    @property
    def capacity(self) -> tuple[int, int]:
        """(slots, positions per slot) currently allocated."""
        return self._slots, self._length_cap

    def cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self._keys)

    def _grow(self, slots: int, length: int) -> None:
        """Reallocate the cache to at least (slots, length), keeping what it holds."""
        slots, length = max(slots, self._slots), max(length, self._length_cap)
        if (slots, length) == (self._slots, self._length_cap):
            return
        shape = (slots, self.num_kv_heads, length, self.head_dim)
        keys, values = [], []
        for i in range(len(self._layers)):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self._keys:
                k[: self._slots, :, : self._length_cap] = self._keys[i]
                v[: self._slots, :, : self._length_cap] = self._values[i]
            keys.append(k)
            values.append(v)
        self._keys, self._values = keys, values
        self._slots, self._length_cap = slots, length

    def reserve(self, slots: int, length: int) -> None:
        """Make room for slot ids < ``slots`` and ``length`` positions, doubling to amortise the copies."""
        new_slots = self._slots
        while new_slots < slots:
            new_slots *= 2
        new_len = self._length_cap
        while new_len < length:
            new_len *= 2
        self._grow(new_slots, min(max(new_len, length), self.max_length_tokens))

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        slots: Sequence[int],
        starts: Sequence[int],
        tokens: Sequence[Sequence[int]],
        keep: Sequence[int],
        pool: Sequence[int] | None = None,
        pooled_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Append tokens[b] to the sequence in slots[b] (which already holds starts[b] tokens) and return the logits
        of each row's last keep[b] new positions, stacked row after row: [sum(keep), V_cfg] in the model dtype.
        pool (routed prompts, runner contract ExtendOp.features_tokens): for each row b with pool[b] = k > 0, the
        mean of the final (normed) hidden state over its first k new positions goes into pooled_out, fp32 [h] per
        row in row order (rows with k = 0 get an empty tensor).

        Rows may append different numbers of tokens: shorter rows are padded on the right. That is exact, because
        under the causal mask no real position attends to a later one; the padding's keys land past the row's length,
        where the next extend overwrites them. The caller keeps every start + max(len) within max_length_tokens.
        """
        B = len(tokens)
        lens = [len(t) for t in tokens]
        n = max(lens)
        end = max(starts) + n
        if end > self.max_length_tokens:
            raise ValueError(f"a row would reach {end} tokens, past max_length_tokens={self.max_length_tokens}")
        self.reserve(max(slots) + 1, end)
        dev = self.device
        ragged = min(lens) != n
        rows = [list(t) + [0] * (n - len(t)) for t in tokens] if ragged else tokens
        token_ids = torch.tensor(rows, dtype=torch.long, device=dev)  # [B, n]
        first = slots[0]
        contiguous = list(slots) == list(range(first, first + B))
        slot_idx = None if contiguous else torch.tensor(list(slots), device=dev)
        start_t = torch.tensor(list(starts), device=dev)  # [B]
        pos = start_t.unsqueeze(1) + torch.arange(n, device=dev)  # [B, n]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self._complex_rope:
            rot = self._rot[pos].unsqueeze(2)  # [B, n, 1, D/2] complex
        else:
            cos = self._cos[pos].unsqueeze(1)  # [B, 1, n, D]
            sin = self._sin[pos].unsqueeze(1)
        uniform = min(starts) == max(starts)
        if uniform and (n == 1 or starts[0] == 0):
            mask, causal = None, n > 1  # every row sees all of its keys (decode) or a plain causal prefill
        else:
            cols = torch.arange(end, device=dev)  # [L]
            mask = (cols.view(1, 1, end) <= pos.unsqueeze(-1)).unsqueeze(1)  # [B, 1, n, L]
            causal = False
        rows_b = torch.arange(B, device=dev).unsqueeze(1)  # [B, 1]
        x = F.embedding(token_ids, self._embed)  # [B, n, h]
        for i, layer in enumerate(self._layers):
            h = _rms_norm(x, layer.ln1, layer.eps1)
            qkv = _mm(h, *layer.qkv).view(B, n, H + 2 * Hkv, D)
            v = qkv[:, :, H + Hkv :].transpose(1, 2)  # [B, Hkv, n, D]
            if self._complex_rope:
                # (x_i, x_{i + D/2}) -> adjacent pairs -> complex; q and k keep this pair-major layout in the cache
                # and in attention, where only q . k is read, which no consistent reordering of D changes
                qk = qkv[:, :, : H + Hkv].unflatten(-1, (2, D // 2)).transpose(-1, -2).contiguous()
                qk = torch.view_as_real(torch.view_as_complex(qk) * rot).flatten(-2)  # [B, n, H + Hkv, D]
                qk = qk.transpose(1, 2)  # [B, H + Hkv, n, D]
                q, k = qk[:, :H], qk[:, H:]
            else:
                q = _rotate(qkv[:, :, :H].transpose(1, 2), cos, sin)  # [B, H, n, D]
                k = _rotate(qkv[:, :, H : H + Hkv].transpose(1, 2), cos, sin)  # [B, Hkv, n, D]
            kc, vc = self._keys[i], self._values[i]  # [S, Hkv, L_cap, D]
            if contiguous:
                kv_rows = slice(first, first + B)
                if uniform:
                    kc[kv_rows, :, starts[0] : starts[0] + n] = k
                    vc[kv_rows, :, starts[0] : starts[0] + n] = v
                else:
                    kc[first + rows_b, :, pos] = k.transpose(1, 2)  # [B, n, Hkv, D] at (slot, pos)
                    vc[first + rows_b, :, pos] = v.transpose(1, 2)
                keys, values = kc[kv_rows, :, :end], vc[kv_rows, :, :end]  # [B, Hkv, end, D] views
            else:
                kc[slot_idx.unsqueeze(1), :, pos] = k.transpose(1, 2)
                vc[slot_idx.unsqueeze(1), :, pos] = v.transpose(1, 2)
                keys = kc[:, :, :end].index_select(0, slot_idx)
                values = vc[:, :, :end].index_select(0, slot_idx)
            if self.groups > 1 and mask is None:
                out = F.scaled_dot_product_attention(
                    q, keys, values, is_causal=causal, scale=self.scaling, enable_gqa=True
                )
            else:
                if self.groups > 1:
                    keys = keys.repeat_interleave(self.groups, dim=1)
                    values = values.repeat_interleave(self.groups, dim=1)
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, is_causal=causal, scale=self.scaling
                )  # [B, H, n, D]
            x = x + _mm(out.transpose(1, 2).reshape(B, n, -1), *layer.o)
            h = _rms_norm(x, layer.ln2, layer.eps2)
            gate, up = _mm(h, *layer.gate_up).split((layer.inter, layer.inter), dim=-1)
            x = x + _mm(F.silu(gate) * up, *layer.down)
        if pool is not None and pooled_out is not None:
            final = _rms_norm(x, self._norm, self._norm_eps)  # [B, n, h]: what HF returns as the last hidden state
            pooled_out += [final[b, :k].float().mean(0).cpu() if k else final.new_empty(0) for b, k in enumerate(pool)]
        if not ragged and min(keep) == max(keep):
            x = x[:, n - keep[0] :].reshape(-1, x.shape[-1])  # [B * keep, h]
        else:
            flat = [b * n + p for b in range(B) for p in range(lens[b] - keep[b], lens[b])]
            x = x.reshape(B * n, -1).index_select(0, torch.tensor(flat, device=dev))  # [sum(keep), h]
        return _mm(_rms_norm(x, self._norm, self._norm_eps), *self._head_t)  # [sum(keep), V_cfg]

    # ------------------------------------------------------------------------------------------------ checks

    def self_check(self, model: Any, vocab_size: int) -> float:
        """Max |logit difference| between this forward and ``model``'s own on a short prompt and one decode step
        (slot 0, which must be free). Raises ValueError above SELF_CHECK_ATOL."""
        n = min(SELF_CHECK_TOKENS, self.max_length_tokens - 1)
        ids = (torch.arange(n + 1, device=self.device) * 7919 % vocab_size).unsqueeze(0)  # [1, n + 1]
        with torch.inference_mode():
            ref = model(input_ids=ids, use_cache=False).logits.float()  # [1, n + 1, V_cfg]
            lean_prefill = self.forward([0], [0], [ids[0, :n].tolist()], [n]).float()  # [n, V_cfg]
            lean_step = self.forward([0], [n], [ids[0, n:].tolist()], [1]).float()  # [1, V_cfg]
        diff = max(
            float((ref[0, :n] - lean_prefill).abs().max()),
            float((ref[0, n:] - lean_step).abs().max()),
        )
        scale = max(1.0, float(ref.abs().max()))
        if diff > SELF_CHECK_ATOL * scale:
            raise ValueError(
                f"lean forward differs from the model's own by {diff:.3g} (limit {SELF_CHECK_ATOL * scale:.3g})"
            )
        return diff
