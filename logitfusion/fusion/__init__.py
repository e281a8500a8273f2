"""Pure tensor math of logit fusion on [B, V]: recipes, DLF solvers, sampling, speculative acceptance.

No models and no I/O here: every function takes fp32 log-probs (or raw logits) batched over rows and is testable
on its own. docs/algorithms.md states what each computes: the recipes (§2), the DLF objective and solvers (§3), the
certified candidate support that fuse() solves DLF on (§4), routing (§6), sampling (§7), speculative acceptance (§8).
"""

from . import presets
from .dlf import SOLVERS, dlf_loss, solve_alphas
from .recipe import FusionResult, Recipe, fuse, fuse_dense
from .sampling import SamplingParams, make_generator, sample, to_probs
from .speculative import speculative_accept

__all__ = [
    "Recipe",
    "FusionResult",
    "fuse",
    "fuse_dense",
    "presets",
    "SamplingParams",
    "make_generator",
    "sample",
    "to_probs",
    "dlf_loss",
    "solve_alphas",
    "speculative_accept",
    "SOLVERS",
]
