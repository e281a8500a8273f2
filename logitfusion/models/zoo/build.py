"""Build, cache and find the zoo.

``build()`` trains every model of the recipe deterministically and writes them under
``<cache root>/<recipe hash>/``: one Hugging Face directory per model plus ``manifest.json`` (recipe hash, recipe,
per-file sha256) and ``report.json`` (parameters, training time and loss per model, the quality check).
``zoo_path()`` finds a usable zoo: the committed one in the package (``logitfusion/models/zoo/data/<name>``) if its
manifest's recipe hash equals the current recipe's, else the cache, else it raises ``ZooNotBuilt``.

Jobs (pre-train S, pre-train L, fine-tune each expert and each large fine-tuned model) run in a pool of
``workers`` processes with one torch thread each; every job reads its base from disk and is seeded on its own, so
the schedule never changes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from logitfusion.models.zoo.recipe import DEFAULT_RECIPE, ZooRecipe, recipe_hash, recipe_json

log = logging.getLogger(__name__)

COMMITTED_ROOT = Path(__file__).resolve().parent / "data"
COMMITTED_NAME = "tiny"
MANIFEST = "manifest.json"
REPORT = "report.json"
CACHE_ENV = "LOGITFUSION_CACHE"


class ZooNotBuilt(FileNotFoundError):
    """No zoo matching the current recipe exists on disk."""


@dataclass(frozen=True)
class ZooPaths:
    """Where each model of a built zoo lives."""

    root: Path
    recipe_hash: str
    small: Path
    large: Path
    experts: dict[str, Path]  # task -> expert_<task>
    large_ft: dict[str, Path]  # task -> large_ft_<task>

    def model(self, name: str) -> Path:
        """The directory of a model by its zoo name: small, large, expert_<task>, large_ft_<task>."""
        table = {"small": self.small, "large": self.large}
        table.update({f"expert_{t}": p for t, p in self.experts.items()})
        table.update({f"large_ft_{t}": p for t, p in self.large_ft.items()})
        if name not in table:
            raise KeyError(f"no zoo model named {name!r}; known: {', '.join(sorted(table))}")
        return table[name]

    def names(self) -> list[str]:
        return ["small", "large", *(f"expert_{t}" for t in self.experts), *(f"large_ft_{t}" for t in self.large_ft)]


def model_names(recipe: ZooRecipe) -> list[str]:
    return [
        "small",
        "large",
        *(f"expert_{t}" for t in recipe.expert_tasks),
        *(f"large_ft_{t}" for t in recipe.expert_tasks + recipe.unseen_tasks),
    ]


def paths_for(root: Path, recipe: ZooRecipe) -> ZooPaths:
    return ZooPaths(
        root=root,
        recipe_hash=recipe_hash(recipe),
        small=root / "small",
        large=root / "large",
        experts={t: root / f"expert_{t}" for t in recipe.expert_tasks},
        large_ft={t: root / f"large_ft_{t}" for t in recipe.expert_tasks + recipe.unseen_tasks},
    )


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$LOGITFUSION_CACHE/zoo``, else ``~/.cache/logitfusion/zoo``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "zoo"
    return Path.home() / ".cache" / "logitfusion" / "zoo"


# ---- manifest -----------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(root: Path, recipe: ZooRecipe) -> dict:
    """Hash every file under ``root`` (except the manifest) and write ``manifest.json``."""
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "recipe_hash": recipe_hash(recipe),
        "recipe": json.loads(recipe_json(recipe)),
        "models": model_names(recipe),
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise ZooNotBuilt(f"no {MANIFEST} in {root}")
    return json.loads(path.read_text())


def verify_manifest(root: Path, *, check_hashes: bool = True) -> list[str]:
    """Problems with the zoo at ``root`` (missing files, sha256 mismatches); an empty list when it is intact."""
    manifest = read_manifest(root)
    problems = []
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif check_hashes and sha256_file(p) != digest:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def _usable(root: Path, recipe: ZooRecipe) -> bool:
    try:
        manifest = read_manifest(root)
    except (ZooNotBuilt, json.JSONDecodeError):
        return False
    if manifest.get("recipe_hash") != recipe_hash(recipe):
        return False
    return not verify_manifest(root, check_hashes=False)


def committed_path() -> Path:
    """Where the committed zoo lives in the package."""
    return COMMITTED_ROOT / COMMITTED_NAME


def zoo_path(cache_dir: str | Path | None = None, recipe: ZooRecipe | None = None) -> Path:
    """The root of a zoo built from ``recipe``: the committed one if it matches, else the cache; or ZooNotBuilt."""
    r = recipe or DEFAULT_RECIPE
    if _usable(committed_path(), r):
        return committed_path()
    cached = cache_root(cache_dir) / recipe_hash(r)
    if _usable(cached, r):
        return cached
    raise ZooNotBuilt(
        f"no zoo for recipe {recipe_hash(r)[:12]} (looked in {committed_path()} and {cached}); "
        "run `logitfusion zoo build` (about 10-15 minutes on 2 CPU cores)"
    )


def load_zoo(cache_dir: str | Path | None = None, recipe: ZooRecipe | None = None) -> ZooPaths:
    """``ZooPaths`` of the zoo ``zoo_path`` finds."""
    r = recipe or DEFAULT_RECIPE
    return paths_for(zoo_path(cache_dir, r), r)


# ---- jobs (run in worker processes) -------------------------------------------------------------------------------


_SAVE_DTYPES = ("float32", "bfloat16")


def _job(recipe: ZooRecipe, root: str, name: str, progress: bool) -> dict:
    """Train the zoo model ``name`` into ``root/name``; returns its report row."""
    import torch

    torch.set_num_threads(recipe.torch_threads)
    if recipe.save_dtype not in _SAVE_DTYPES:
        raise ValueError(f"ZooRecipe.save_dtype must be one of {', '.join(_SAVE_DTYPES)}, got {recipe.save_dtype!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers import LlamaForCausalLM

    from logitfusion.models.zoo import train
    from logitfusion.models.zoo.tokenizer import build_tokenizer, save_tokenizer
    from logitfusion.models.zoo.world import cached_world, task_items

    world = cached_world(recipe.world)
    tok = build_tokenizer(world)
    out = Path(root) / name
    if name in ("small", "large"):
        spec = recipe.small if name == "small" else recipe.large
        pspec = recipe.pretrain_small if name == "small" else recipe.pretrain_large
        model = train.init_model(spec, tok)
        rep = train.pretrain(model, world, tok, pspec, label=name, progress=progress)
    else:
        base, task = ("small", name[len("expert_") :]) if name.startswith("expert_") else ("large", name[9:])
        model = LlamaForCausalLM.from_pretrained(str(Path(root) / base), dtype=torch.float32)
        fspec = recipe.finetune_small if base == "small" else recipe.finetune_large
        items = task_items(world, task, "train")
        rep = train.finetune(model, world, items, tok, fspec, label=name, progress=progress)
    model.config.name_or_path = name
    model.to(getattr(torch, recipe.save_dtype)).save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(world, out)
    return {"name": name, "num_parameters": train.num_parameters(model), **asdict(rep)}


def _schedule(recipe: ZooRecipe) -> dict[str, str | None]:
    """job -> the job it depends on (None for a pre-training)."""
    deps: dict[str, str | None] = {"large": None, "small": None}  # large first: it is the longest job
    deps.update({f"expert_{t}": "small" for t in recipe.expert_tasks})
    deps.update({f"large_ft_{t}": "large" for t in recipe.expert_tasks + recipe.unseen_tasks})
    return deps


def _run_jobs(recipe: ZooRecipe, root: Path, workers: int, progress: bool) -> list[dict]:
    deps = _schedule(recipe)
    if workers == 1:  # in this process, in dependency order (the schedule lists bases first)
        return [_job(recipe, str(root), name, progress) for name in deps]
    done: dict[str, dict] = {}
    pending = list(deps)  # order: large first (the longest), then small, then fine-tunes
    running: dict[Future, str] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        while pending or running:
            for name in list(pending):
                if len(running) >= workers:
                    break
                dep = deps[name]
                if dep is None or dep in done:
                    pending.remove(name)
                    running[pool.submit(_job, recipe, str(root), name, progress)] = name
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                done[name] = fut.result()
                log.info("zoo: %s done in %.1f s (%d params)", name, done[name]["wall_s"], done[name]["num_parameters"])
    return [done[n] for n in deps]


def build(
    cache_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    recipe: ZooRecipe | None = None,
    workers: int = 2,
    check: bool = True,
    on_done: Callable[[ZooPaths], None] | None = None,
) -> ZooPaths:
    """Train the zoo into ``<cache root>/<recipe hash>`` (reused unless ``force``) and return its paths.

    ``check`` runs the quality check (accuracies of every model on held-out items) and stores it in report.json.
    """
    r = recipe or DEFAULT_RECIPE
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    h = recipe_hash(r)
    final = cache_root(cache_dir) / h
    if _usable(final, r) and not force:
        log.info("zoo: reusing %s", final)
        return paths_for(final, r)
    work = final.with_name(f"{h}.partial-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    log.info("zoo: building recipe %s into %s with %d workers", h[:12], final, workers)
    rows = _run_jobs(r, work, workers, progress)
    report: dict = {"recipe_hash": h, "train": rows, "train_wall_s": time.monotonic() - t0}
    if check:
        from logitfusion.models.zoo.quality import quality_table

        t1 = time.monotonic()
        report["quality"] = quality_table(paths_for(work, r), r)
        report["check_wall_s"] = time.monotonic() - t1
    report["build_wall_s"] = time.monotonic() - t0
    (work / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    write_manifest(work, r)
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    log.info("zoo: built in %.0f s at %s", report["build_wall_s"], final)
    paths = paths_for(final, r)
    if on_done is not None:
        on_done(paths)
    return paths
