"""Pure tensor math of logit fusion on [B, V]: recipes, DLF solvers, sampling, speculative acceptance.

No models and no I/O here: every function takes fp32 log-probs (or raw logits) batched over rows and is testable
on its own. docs/algorithms.md states what each computes: the recipes (§2), the DLF objective and solvers (§3), the
certified candidate support that fuse() solves DLF on (§4), routing (§6), sampling (§7), speculative acceptance (§8).
methods.py is the table of recipe methods; it imports no torch, so the names below are imported on first use (the
CLI reads the table without paying for torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import methods, presets
    from .dlf import dlf_loss, solve_alphas
    from .methods import SOLVERS
    from .recipe import FusionResult, Recipe, fuse, fuse_dense
    from .sampling import SamplingParams, make_generator, sample, to_probs
    from .speculative import speculative_accept

_EXPORTS = {  # name -> the submodule that defines it
    "Recipe": "recipe",
    "FusionResult": "recipe",
    "fuse": "recipe",
    "fuse_dense": "recipe",
    "SamplingParams": "sampling",
    "make_generator": "sampling",
    "sample": "sampling",
    "to_probs": "sampling",
    "dlf_loss": "dlf",
    "solve_alphas": "dlf",
    "speculative_accept": "speculative",
    "SOLVERS": "methods",
}
__all__ = [*_EXPORTS, "presets", "methods"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        if name in ("presets", "methods"):
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
