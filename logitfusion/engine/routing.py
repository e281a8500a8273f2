"""The Decoder's side of routed recipes (fusion/routing.py): example tables through the runner contract.

A routed recipe carries its experts' example prompts as token ids. The first time the Decoder meets a routing it
runs those prompts through the routing model's runner once (extends with ``features_tokens``, released at once) and
keeps the table; a request's own representation comes back with its prefill, so routing a request costs no extra
forward.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict

import torch

from logitfusion.engine.runner import ExtendOp, ModelRunner, RunnerError, StepPlan
from logitfusion.fusion.routing import RouteTable, Routing, build_table

logger = logging.getLogger(__name__)

MAX_TABLES = 32  # distinct example sets kept (per-request overrides of tau / top_k / threshold reuse a table)


def split_features(model: str, out: list[torch.Tensor], n_extends: int, n_features: int) -> list[torch.Tensor]:
    """The feature vectors that follow the logits in a runner's result (runner contract); RunnerError if absent."""
    feats = out[n_extends:]
    if len(feats) != n_features:
        raise RunnerError(
            f"runner {model!r} returned {len(feats)} feature vectors for {n_features} extends with features_tokens: "
            "it cannot serve routed recipes (update the worker)"
        )
    return feats


def compute_table(runner: ModelRunner, routing: Routing) -> RouteTable:
    """Run every example prompt through ``runner`` once and build the routing table."""
    prefix = f"route-table-{uuid.uuid4().hex[:12]}"
    ops, owners = [], []
    for t, prompts in enumerate(routing.examples):
        for i, ids in enumerate(prompts):
            ops.append(ExtendOp(f"{prefix}/{t}/{i}", tuple(ids), "last", features_tokens=len(ids)))
            owners.append(t)
    try:
        out = runner.step(StepPlan(extends=tuple(ops)))
    finally:
        runner.step(StepPlan(releases=tuple(op.seq_id for op in ops)))
    feats = split_features(routing.model, out, len(ops), len(ops))
    per_expert = [torch.stack([f for f, o in zip(feats, owners) if o == t]) for t in range(len(routing.examples))]
    logger.info("routing table on %s: %d example prompts for %d experts", routing.model, len(ops), len(per_expert))
    return build_table(per_expert, routing.centre)


class RouteTables:
    """Routing tables by example set, computed on first use (on the Decoder's step thread) and kept."""

    def __init__(self) -> None:
        self._tables: OrderedDict[tuple, tuple[tuple, RouteTable]] = OrderedDict()  # key -> (examples, table)

    def get(self, routing: Routing, runner: ModelRunner) -> RouteTable:
        key = routing.table_key()
        hit = self._tables.get(key)
        if hit is not None and hit[0] == routing.examples:  # the same tuple object in the common case: no compare
            self._tables.move_to_end(key)
            return hit[1]
        table = compute_table(runner, routing)
        self._tables[key] = (routing.examples, table)
        while len(self._tables) > MAX_TABLES:
            self._tables.popitem(last=False)
        return table
