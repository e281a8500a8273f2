"""Functions the harness YAML files here name with ``!function utils.<name>`` (lm-eval imports this file)."""

from __future__ import annotations

from pathlib import Path

from logitfusion.models.zoo.tasks import score

DATA = Path(__file__).resolve().parent / "capital.jsonl"


def load_capital(**_metadata):
    """The local capital.jsonl as a DatasetDict with one split, "test" (no network: the packaged json builder)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA)})


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match with the zoo's own rule (tasks.score): what `logitfusion eval` counts as correct."""
    return {"exact_match": score(results[0], doc["reference"])}
