"""The zoo capital questions as lm-evaluation-harness data: ``capital.jsonl`` in this directory.

One line per held-out capital item of the zoo (logitfusion.models.zoo.tasks.eval_items("capital"), in its order):
the prompt, the reference answer (what `logitfusion eval` scores against), and four choices for the
multiple-choice task: the reference and the same sentence with three other lands' capitals, the right one at
position ``label`` (rotating with the item index). Two tasks read it (see the YAML files here):

    zoo_capital_gen   generate_until, scored with the zoo's own exact match (tasks.score), like `logitfusion eval`
    zoo_capital_mc    multiple_choice by loglikelihood: the right capital among four

    python -m logitfusion.eval.harness.build          # rewrite capital.jsonl (a unit test checks it is current)
"""

from __future__ import annotations

import json
from pathlib import Path

from logitfusion.models.zoo import tasks as zt

HERE = Path(__file__).resolve().parent
DATA = HERE / "capital.jsonl"
NUM_CHOICES = 4


def capital_rows() -> list[dict]:
    """The rows of capital.jsonl, computed from the zoo's world (deterministic)."""
    items = zt.eval_items("capital")
    rows = []
    for i, it in enumerate(items):
        if not it.reference.endswith(it.value):
            raise ValueError(f"item {i}: the reference {it.reference!r} does not end with its value {it.value!r}")
        stem = it.reference[: len(it.reference) - len(it.value)]
        others = [items[(i + k) % len(items)].value for k in range(1, NUM_CHOICES)]
        label = i % NUM_CHOICES
        values = others[:label] + [it.value] + others[label:]
        rows.append({
            "key": it.key,
            "prompt": it.prompt,
            "reference": it.reference,
            "choices": [stem + v for v in values],
            "label": label,
        })
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def main() -> int:
    DATA.write_text(render(capital_rows()))
    print(f"wrote {DATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
