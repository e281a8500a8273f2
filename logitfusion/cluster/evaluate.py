"""Large evaluations as a Ray job: a dataset through N fusion pipelines in parallel, several recipes in one run.

    python -m logitfusion.cluster.evaluate --config configs/eval.yaml
    ray job submit --working-dir . -- python -m logitfusion.cluster.evaluate --config configs/eval.yaml

Work units are (dataset item x method). The driver hands chunks of units to N ``EvalPipeline`` actors (data
parallel; each actor holds one Decoder over every model the chosen methods read) and appends every finished unit
to ``results.jsonl`` as soon as its chunk returns (flushed and fsync'd), so a killed job loses at most the chunks
in flight. Run again with the same config and output directory: units already in ``results.jsonl`` are skipped
(a torn last line is dropped), so the final results equal an uninterrupted run's, with no unit lost or duplicated.
A unit that exceeds ``item_timeout_s`` or fails (a prompt over the model's length limit, say) is recorded with its
status and message, never fatal. The run ends with ``summary.json``, ``summary.md`` (accuracy, gap closed, score
ratio and PGR per dataset and method) and ``weights.png`` (the per-step expert weights of a few examples).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("logitfusion.evaluate")

RESULTS = "results.jsonl"
STATUS_OK, STATUS_TIMEOUT, STATUS_ERROR = "ok", "timeout", "error"


# ---------------------------------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetSpec(_Strict):
    """One dataset: a zoo task, or a JSONL file of {"id", "prompt", "reference"} rows scored like a zoo task."""

    zoo_task: str | None = Field(None, description="a zoo task name (its held-out items)")
    jsonl: str | None = Field(None, description="path of a JSONL file (relative to the config's directory)")
    name: str | None = Field(None, description="report name (default: the task or the file stem)")
    task: str | None = Field(None, description="for jsonl: the zoo task whose expert / large_ft models apply")
    limit: int | None = Field(None, ge=1, description="first N items only")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if (self.zoo_task is None) == (self.jsonl is None):
            raise ValueError("datasets[]: give exactly one of zoo_task or jsonl")
        if self.jsonl is not None and self.task is None:
            raise ValueError(f"datasets[] jsonl={self.jsonl!r}: also give task (the zoo task whose experts apply)")
        return self

    @property
    def model_task(self) -> str:
        return self.zoo_task or self.task  # type: ignore[return-value]

    @property
    def label(self) -> str:
        return self.name or self.zoo_task or Path(self.jsonl or "").stem


class EvalConfig(_Strict):
    """An evaluation run. YAML is only its serialisation."""

    datasets: tuple[DatasetSpec, ...] = Field(min_length=1, description="what to evaluate")
    methods: tuple[str, ...] = Field(
        ("large_base", "expert", "large_finetuned", "static", "dlf_grid", "dlf_newton", "dlf_joint"),
        min_length=1,
        description="method names of logitfusion.eval.run.methods_for_task",
    )
    output_dir: str = Field("results/eval-job", description="results.jsonl, summary.{json,md}, weights.png")
    pipelines: int = Field(2, ge=1, le=256, description="fusion pipelines run in parallel (Ray actors)")
    pipeline_num_cpus: float = Field(0.5, gt=0, le=256, description="CPUs reserved per pipeline")
    pipeline_num_gpus: float = Field(0.0, ge=0, le=8, description="GPUs per pipeline (0 on a CPU cluster)")
    batch_size: int = Field(16, ge=1, le=1024, description="requests decoded together in one pipeline")
    chunk_size: int = Field(16, ge=1, le=4096, description="units per task handed to a pipeline")
    item_timeout_s: float = Field(120.0, gt=0, le=86400, description="a unit running longer is recorded as timeout")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="override the tasks' generation budgets")
    fewshot_k: int = Field(3, ge=0, le=16, description="solved examples for *_fewshot methods")
    plot_examples: int = Field(3, ge=0, le=20, description="examples drawn in weights.png")
    models: dict[str, str] = Field(default_factory=dict, description="model name -> directory (default: the zoo)")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: the job's, or a local one)")

    @classmethod
    def load(cls, path: str | Path) -> EvalConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        data = yaml.safe_load(path.read_text()) or {}
        base = path.resolve().parent
        for d in data.get("datasets", []) or []:
            if isinstance(d, dict) and d.get("jsonl") and not Path(d["jsonl"]).is_absolute():
                d["jsonl"] = str(base / d["jsonl"])
        return cls.model_validate(data)


# ---------------------------------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    """One (item, method): a request the pipelines run."""

    key: str  # "<dataset>/<method>/<item id>": unique, stable across runs
    dataset: str
    method: str
    setting: str
    item_id: str
    prompt: str
    reference: str
    recipe: Any  # fusion.Recipe
    model_prompt: dict[str, str]  # model name -> its own prompt text (few-shot)
    max_new_tokens: int


@dataclass
class UnitResult:
    key: str
    dataset: str
    method: str
    setting: str
    item_id: str
    status: str  # ok | timeout | error
    output: str = ""
    reference: str = ""
    correct: float = 0.0
    message: str = ""
    weights: list[list[float]] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    latency_s: float = 0.0


def _items(ds: DatasetSpec) -> list[tuple[str, str, str]]:
    """(item id, prompt, reference) of a dataset."""
    if ds.zoo_task:
        from logitfusion.models.zoo import tasks as zt

        return [(it.key, it.prompt, it.reference) for it in zt.eval_items(ds.zoo_task, limit=ds.limit)]
    rows = []
    with open(ds.jsonl, encoding="utf-8") as f:  # type: ignore[arg-type]
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((str(row.get("id", lineno)), str(row["prompt"]), str(row["reference"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{ds.jsonl}:{lineno}: need a JSON object with prompt and reference ({exc})") from exc
    return rows[: ds.limit] if ds.limit else rows


def make_units(cfg: EvalConfig) -> list[Unit]:
    """Every (item, method) of the run, in a fixed order."""
    from logitfusion.eval.run import methods_for_task
    from logitfusion.models.zoo import tasks as zt

    unseen = set(zt.unseen_tasks())
    experts = [f"expert_{t}" for t in zt.expert_tasks()]
    examples = _route_examples(cfg) if any(name.startswith("routed") for name in cfg.methods) else None
    units, seen = [], set()
    for ds in cfg.datasets:
        task = ds.model_task
        known = {m.name: m for m in methods_for_task(task, experts, task in unseen, route_examples=examples)}
        for name in cfg.methods:
            if name not in known:
                raise ValueError(f"methods: {name!r} does not apply to task {task!r}; choose from {', '.join(known)}")
        budget = cfg.max_new_tokens or zt.max_new_tokens(task)
        for item_id, prompt, ref in _items(ds):
            for name in cfg.methods:
                m = known[name]
                key = f"{ds.label}/{name}/{item_id}"
                if key in seen:
                    raise ValueError(f"dataset {ds.label!r}: item id {item_id!r} appears twice")
                seen.add(key)
                fewshot = {m.fewshot_model: zt.few_shot_prompt(task, prompt, cfg.fewshot_k)} if m.fewshot_model else {}
                units.append(Unit(key, ds.label, name, m.setting, item_id, prompt, ref, m.recipe, fewshot, budget))
    return units


def _route_examples(cfg: EvalConfig) -> tuple:
    """The routed methods' expert examples: 8 training prompts per zoo expert task, in the small base's tokens."""
    from logitfusion.eval.run import zoo_route_examples
    from logitfusion.models.zoo import tasks as zt
    from logitfusion.models.zoo.build import load_zoo

    small = cfg.models.get("small") or load_zoo().model("small")  # the tokenizer the pipelines encode prompts with
    return zoo_route_examples(small, zt.expert_tasks())


# ---------------------------------------------------------------------------------------------------- results file


def read_done(path: Path) -> dict[str, dict]:
    """Finished units of an earlier run; a torn last line (killed mid-write) is cut off the file."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    good_bytes = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break
            done[rec["key"]] = rec
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        log.warning("%s: dropping a torn last line (%d bytes)", path, path.stat().st_size - good_bytes)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


class ResultsWriter:
    """Appends results durably: one JSON line each, flushed and fsync'd per batch."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, results: Iterable[UnitResult]) -> None:
        for r in results:
            self._f.write(json.dumps(asdict(r), sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# ---------------------------------------------------------------------------------------------------- the pipeline


class EvalPipeline:
    """One fusion pipeline: a Decoder over in-process runners of every model the run reads. A Ray actor."""

    def __init__(self, model_dirs: dict[str, str], batch_size: int, item_timeout_s: float) -> None:
        import torch

        torch.set_num_threads(1)
        from logitfusion.engine.decoder import Decoder
        from logitfusion.engine.local import LocalRunner

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self._runners = {n: LocalRunner.from_pretrained(p, n, device=device) for n, p in sorted(model_dirs.items())}
        tok = next(iter(self._runners.values())).tokenizer
        self._tok = tok
        self._decoder = Decoder(
            self._runners,
            eos_token_ids=[tok.eos_token_id],
            decode_fn=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
            max_batch_size=batch_size,
            max_waiting_requests=1 << 20,
        )
        self._timeout_s = item_timeout_s

    def run(self, units: Sequence[Unit]) -> list[UnitResult]:
        """Decode every unit of the chunk; timeouts and failures are results, not exceptions."""
        from logitfusion.engine.decoder import FINISH_INVALID, FINISH_TIMEOUT, GenerationRequest
        from logitfusion.fusion import SamplingParams
        from logitfusion.models.zoo.tasks import score

        out: dict[str, UnitResult] = {}
        by_key = {u.key: u for u in units}
        requests = (
            GenerationRequest(
                request_id=u.key,
                prompt_ids=self._tok(u.prompt)["input_ids"],
                recipe=u.recipe,
                sampling=SamplingParams(),
                max_new_tokens=u.max_new_tokens,
                stop_strings=("\n",),
                model_prompts={m: self._tok(t)["input_ids"] for m, t in u.model_prompt.items()},
            )
            for u in units
        )
        t0 = time.monotonic()  # every unit is added at once, before the first step
        for res in self._decoder.run(requests, timeout_s=self._timeout_s):
            u = by_key[res.request_id]
            done = UnitResult(u.key, u.dataset, u.method, u.setting, u.item_id, STATUS_OK, reference=u.reference,
                              latency_s=time.monotonic() - t0)
            if res.finish_reason == FINISH_INVALID:  # the Decoder's validation names the field and the limit
                done.status, done.message, done.latency_s = STATUS_ERROR, res.error, 0.0
            elif res.finish_reason == FINISH_TIMEOUT:
                done.status, done.message = STATUS_TIMEOUT, f"item_timeout_s={self._timeout_s} exceeded"
            else:
                done.output, done.correct = res.text, score(res.text, u.reference)
                done.weights, done.experts = res.weights, list(res.experts)
            out[u.key] = done
        return [out[u.key] for u in units]


def _model_dirs(cfg: EvalConfig, units: Sequence[Unit], merged_dir: Path | None) -> dict[str, str]:
    from logitfusion.eval.run import MERGED
    from logitfusion.models.zoo.build import load_zoo

    names = sorted({m for u in units for m in u.recipe.model_names()})
    zoo = None
    dirs = {}
    for n in names:
        if n in cfg.models:
            dirs[n] = cfg.models[n]
        elif n == MERGED and merged_dir is not None:
            dirs[n] = str(merged_dir)
        else:
            zoo = zoo or load_zoo()
            dirs[n] = str(zoo.model(n))
    return dirs


# ---------------------------------------------------------------------------------------------------- the driver


def summarize(cfg: EvalConfig, records: Sequence[dict]) -> tuple[list, str]:
    """Rows (accuracy, gap closed, score ratio, PGR) per dataset and method, and the markdown report."""
    from logitfusion.eval.metrics import Row, format_table, gap_closed, pgr, score_ratio

    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    status: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    setting = {}
    for r in records:
        acc[r["dataset"]][r["method"]].append(float(r["correct"]))
        status[r["method"]][r["status"]] += 1
        setting[(r["dataset"], r["method"])] = r["setting"]
    rows = []
    for ds in cfg.datasets:
        a = {m: sum(v) / len(v) for m, v in acc[ds.label].items() if v}
        lb, lft, ex = a.get("large_base"), a.get("large_finetuned"), a.get("expert")
        for m in cfg.methods:
            if m not in a:
                continue
            rows.append(
                Row(
                    task=ds.label,
                    method=m,
                    accuracy=a[m],
                    gap_closed=None if lb is None or lft is None else gap_closed(a[m], lb, lft),
                    score_ratio=None if lft is None else score_ratio(a[m], lft),
                    pgr=None if ex is None or lft is None else pgr(a[m], ex, lft),
                    n_items=len(acc[ds.label][m]),
                    setting=setting[(ds.label, m)],
                )
            )
    lines = ["# Evaluation summary", "", format_table(rows), "", "| method | ok | timeout | error |", "|---|---:|---:|---:|"]
    for m in cfg.methods:
        s = status.get(m, {})
        lines.append(f"| {m} | {s.get(STATUS_OK, 0)} | {s.get(STATUS_TIMEOUT, 0)} | {s.get(STATUS_ERROR, 0)} |")
    return rows, "\n".join(lines) + "\n"


def plot_weights(records: Sequence[dict], path: Path, n_examples: int) -> bool:
    """Per-step expert weights of the first ``n_examples`` DLF results; False when there is nothing to draw."""
    picks = [r for r in sorted(records, key=lambda r: r["key"]) if r["status"] == STATUS_OK and r["weights"]
             and r["method"].startswith("dlf")][:n_examples]
    if not picks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(picks), 1, figsize=(7, 2.2 * len(picks)), squeeze=False)
    for ax, r in zip(axes[:, 0], picks, strict=True):
        steps = range(1, len(r["weights"]) + 1)
        for t, name in enumerate(r["experts"]):
            ax.plot(steps, [w[t] for w in r["weights"]], marker="o", label=name)
        ax.set_title(f"{r['key']}  ->  {r['output']!r}", fontsize=8)
        ax.set_xlabel("decoding step")
        ax.set_ylabel("alpha")
        ax.set_ylim(-0.05, 2.05)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _default_env_vars() -> dict[str, str]:
    """One thread per worker process, minus what a submitted job's own runtime env already sets.

    Ray refuses a driver's runtime env that names an environment variable the job's runtime env (`ray job submit
    --runtime-env-json`) also names, so the job's choice wins and only the missing defaults are added.
    """
    defaults = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for a submitted job
    if job_config:
        try:
            job_vars = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_vars = {}
        defaults = {k: v for k, v in defaults.items() if k not in job_vars}
    return defaults


def _connect_ray(cfg: EvalConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # under `ray job submit` the job's cluster is in RAY_ADDRESS
        env = {"env_vars": _default_env_vars()}
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING)
    else:
        from logitfusion.cluster.cli import start_local_ray

        start_local_ray()


def run_evaluation(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) an evaluation; returns the summary dict that is also written to summary.json."""
    import ray
    from tqdm import tqdm

    from logitfusion.eval.metrics import Row
    from logitfusion.eval.run import MERGED, merge_all_experts

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = make_units(cfg)
    results_path = out / RESULTS
    done = read_done(results_path)
    todo = [u for u in units if u.key not in done]
    log.info("%d units, %d already done, %d to run on %d pipelines", len(units), len(done), len(todo), cfg.pipelines)

    if todo:
        merged = None
        if any(MERGED in u.recipe.model_names() for u in todo) and MERGED not in cfg.models:
            from logitfusion.models.zoo.build import load_zoo

            merged = merge_all_experts(load_zoo(), out / "merged_experts")
        dirs = _model_dirs(cfg, todo, merged)
        _connect_ray(cfg)
        actor_cls = ray.remote(EvalPipeline)
        n = min(cfg.pipelines, max(1, -(-len(todo) // cfg.chunk_size)))
        actors = [
            actor_cls.options(num_cpus=cfg.pipeline_num_cpus, num_gpus=cfg.pipeline_num_gpus, max_restarts=1,
                              max_task_retries=1).remote(dirs, cfg.batch_size, cfg.item_timeout_s)
            for _ in range(n)
        ]
        chunks = [todo[i : i + cfg.chunk_size] for i in range(0, len(todo), cfg.chunk_size)]
        writer = ResultsWriter(results_path)
        bar = tqdm(total=len(units), initial=len(done), desc="evaluate", unit="unit", disable=not progress,
                   mininterval=1.0, file=sys.stderr)
        inflight: dict[Any, int] = {}
        free = list(range(n))
        try:
            while chunks or inflight:
                while chunks and free:
                    a = free.pop()
                    inflight[actors[a].run.remote(chunks.pop(0))] = a
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    free.append(inflight.pop(ref))
                    results = ray.get(ref)
                    writer.write(results)
                    bar.update(len(results))
                    log.info("progress %d/%d units", bar.n, len(units))
        finally:
            writer.close()
            bar.close()
            for a in actors:
                ray.kill(a)

    records = list(read_done(results_path).values())
    wanted = {u.key for u in units}
    records = sorted((r for r in records if r["key"] in wanted), key=lambda r: r["key"])
    rows, md = summarize(cfg, records)
    summary = {
        "units": len(units),
        "status": {s: sum(r["status"] == s for r in records) for s in (STATUS_OK, STATUS_TIMEOUT, STATUS_ERROR)},
        "rows": [asdict(r) for r in rows if isinstance(r, Row)],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(md)
    plotted = plot_weights(records, out / "weights.png", cfg.plot_examples)
    print(md)
    print(f"results: {results_path}  summary: {out / 'summary.json'}" + (f"  plot: {out / 'weights.png'}" if plotted else ""))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m logitfusion.cluster.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="evaluation YAML (see configs/eval.yaml)")
    p.add_argument("--output-dir", default=None, help="override the config's output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = EvalConfig.load(args.config)
        if args.output_dir:
            cfg = cfg.model_copy(update={"output_dir": args.output_dir})
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_evaluation(cfg, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
