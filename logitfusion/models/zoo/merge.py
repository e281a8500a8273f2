"""Task arithmetic: merge experts into one checkpoint, theta = theta_S + sum_t lambda_t * (theta_{E_t} - theta_S).

The experts must be fine-tuned from the base: same architecture config, same tensor names and shapes, same
tokenizer. The merged model is written in the same Hugging Face layout (config.json, model.safetensors and the
base's tokenizer files), so every loader treats it like any other checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# config keys that may differ between a base and its fine-tuned copies without changing the architecture
_CONFIG_IGNORED = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    return json.loads(path.read_text())


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    path = model_dir / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in model directory {model_dir} (only single-file safetensors merge)")
    return load_file(str(path))


def _arch(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _CONFIG_IGNORED}


def _check_compatible(base_dir: Path, base_cfg: dict, base_w: dict, exp_dir: Path, cfg: dict, w: dict) -> None:
    a, b = _arch(base_cfg), _arch(cfg)
    if a != b:
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        diffs = ", ".join(f"{k}={b.get(k)!r} (base: {a.get(k)!r})" for k in keys)
        raise ValueError(f"config mismatch: {exp_dir} differs from the base {base_dir}: {diffs}")
    if set(base_w) != set(w):
        only = sorted(set(base_w) ^ set(w))[0]
        where = base_dir if only in base_w else exp_dir
        raise ValueError(f"tensor {only!r} exists only in {where}; {exp_dir} is not fine-tuned from {base_dir}")
    for name, t in base_w.items():
        if t.shape != w[name].shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(w[name].shape)} in {exp_dir} but {tuple(t.shape)} in {base_dir}"
            )
    for fname in ("tokenizer.json",):
        pa, pb = base_dir / fname, exp_dir / fname
        if pa.is_file() and pb.is_file() and pa.read_bytes() != pb.read_bytes():
            raise ValueError(f"{fname} of {exp_dir} differs from the base's ({base_dir}): not the same tokenizer")


def merge_weights(
    base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]], lambdas: Sequence[float]
) -> dict[str, torch.Tensor]:
    """theta_S + sum_t lambda_t (theta_t - theta_S), computed in float64, cast back to each base tensor's dtype."""
    out = {}
    for name, t in base.items():
        acc = t.double()  # float64: S + 1 * (E - S) == E exactly for fp32 and bf16 weights
        for weights, lam in zip(experts, lambdas, strict=True):
            if lam != 0.0:
                acc = acc + lam * (weights[name].double() - t.double())
        out[name] = acc.to(t.dtype).contiguous()
    return out


def merge_experts(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    lambdas: Sequence[float],
    out_dir: str | Path,
) -> Path:
    """Write S + sum_t lambda_t (E_t - S) to ``out_dir`` (weights, config, the base's tokenizer files)."""
    base_p = Path(base_dir)
    exp_ps = [Path(d) for d in expert_dirs]
    out_p = Path(out_dir)
    if not exp_ps:
        raise ValueError("merge_experts: expert_dirs is empty; give at least one expert")
    if len(lambdas) != len(exp_ps):
        raise ValueError(f"merge_experts: {len(lambdas)} lambdas for {len(exp_ps)} experts; give one per expert")
    for i, lam in enumerate(lambdas):
        if not math.isfinite(float(lam)):
            raise ValueError(f"merge_experts: lambdas[{i}] = {lam} is not a finite number")
    if out_p.resolve() in {base_p.resolve(), *(p.resolve() for p in exp_ps)}:
        raise ValueError(f"merge_experts: out_dir {out_p} is one of the inputs; choose a new directory")
    for p in (base_p, *exp_ps):
        if not p.is_dir():
            raise FileNotFoundError(f"model directory does not exist: {p}")
    base_cfg, base_w = _read_config(base_p), _read_weights(base_p)
    experts = []
    for p in exp_ps:
        cfg, w = _read_config(p), _read_weights(p)
        _check_compatible(base_p, base_cfg, base_w, p, cfg, w)
        experts.append(w)
    merged = merge_weights(base_w, experts, [float(x) for x in lambdas])
    out_p.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out_p / WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(base_p / "config.json", out_p / "config.json")
    if (base_p / "generation_config.json").is_file():
        shutil.copyfile(base_p / "generation_config.json", out_p / "generation_config.json")
    for fname in TOKENIZER_FILES:
        if (base_p / fname).is_file():
            shutil.copyfile(base_p / fname, out_p / fname)
    (out_p / "merge.json").write_text(
        json.dumps(
            {"base": str(base_p), "experts": [str(p) for p in exp_ps], "lambdas": [float(x) for x in lambdas]},
            indent=2,
        )
    )
    log.info("merged %d experts into %s (lambdas %s)", len(exp_ps), out_p, list(lambdas))
    return out_p
