"""Zoo build mechanics on a micro recipe (seconds): layout, manifest, cache reuse, determinism, lookup order.

And the committed zoo: its files match its manifest and the manifest's recipe hash is the current recipe's, so a
recipe change without a rebuild fails here.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitfusion.models.zoo.recipe import (
    DEFAULT_RECIPE,
    FinetuneSpec,
    ModelSpec,
    PretrainSpec,
    WorldSpec,
    ZooRecipe,
    recipe_hash,
)

zb = importlib.import_module("logitfusion.models.zoo.build")  # the module; the package attribute `build` is the function

MICRO = ZooRecipe(
    world=WorldSpec(n_entities=12, add_max=4),
    small=ModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
    large=ModelSpec(hidden_size=24, num_layers=1, num_heads=2, intermediate_size=48),
    pretrain_small=PretrainSpec(steps=2, batch_rows=4, seq_len_tokens=32, warmup_steps=1),
    pretrain_large=PretrainSpec(steps=2, batch_rows=4, seq_len_tokens=32, warmup_steps=1),
    finetune_small=FinetuneSpec(steps=2, batch_rows=4, warmup_steps=1),
    finetune_large=FinetuneSpec(steps=2, batch_rows=4, warmup_steps=1),
    expert_tasks=("capital", "colour", "add"),
    unseen_tasks=("animal",),
)


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> zb.ZooPaths:
    return zb.build(cache_dir=tmp_path_factory.mktemp("cache"), recipe=MICRO, workers=1, progress=False)


@pytest.mark.timeout(240)
def test_micro_build_layout_and_manifest(micro_zoo: zb.ZooPaths) -> None:
    root = micro_zoo.root
    assert root.name == recipe_hash(MICRO)
    assert micro_zoo.names() == zb.model_names(MICRO)
    assert set(micro_zoo.experts) == {"capital", "colour", "add"}
    assert set(micro_zoo.large_ft) == {"capital", "colour", "add", "animal"}
    for name in micro_zoo.names():
        d = micro_zoo.model(name)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{name}/{f}"
    model = AutoModelForCausalLM.from_pretrained(str(micro_zoo.model("expert_capital")), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(micro_zoo.model("expert_capital")), local_files_only=True)
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 32 == 0
    manifest = json.loads((root / zb.MANIFEST).read_text())
    assert manifest["recipe_hash"] == recipe_hash(MICRO)
    assert "small/model.safetensors" in manifest["files"] and "report.json" in manifest["files"]
    assert zb.verify_manifest(root) == []
    report = json.loads((root / zb.REPORT).read_text())
    assert set(report["quality"]["tasks"]) == {"capital", "colour", "add", "animal"}
    assert {"large", "small", "expert", "static", "large_ft"} <= set(report["quality"]["tasks"]["capital"])
    with pytest.raises(KeyError, match="no zoo model named 'expert_animal'"):
        micro_zoo.model("expert_animal")


@pytest.mark.timeout(240)
def test_rebuild_is_bit_identical_and_cache_is_reused(micro_zoo: zb.ZooPaths, tmp_path: Path) -> None:
    cache = micro_zoo.root.parent
    before = (micro_zoo.root / zb.MANIFEST).stat().st_mtime_ns
    again = zb.build(cache_dir=cache, recipe=MICRO, workers=1, progress=False)
    assert (again.root / zb.MANIFEST).stat().st_mtime_ns == before  # reused, not retrained
    fresh = zb.build(cache_dir=tmp_path, recipe=MICRO, workers=1, progress=False, check=False)
    files_a = json.loads((micro_zoo.root / zb.MANIFEST).read_text())["files"]
    files_b = json.loads((fresh.root / zb.MANIFEST).read_text())["files"]
    weights = [k for k in files_a if k.endswith(".safetensors")]
    assert weights and all(files_a[k] == files_b[k] for k in weights), "same recipe must give the same weights"


def test_tampered_files_are_detected(micro_zoo: zb.ZooPaths, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / micro_zoo.root.name
    shutil.copytree(micro_zoo.root, copy)
    (copy / "small" / "config.json").write_text("{}")
    (copy / "large" / "model.safetensors").unlink()
    problems = zb.verify_manifest(copy)
    assert "small/config.json: sha256 differs from the manifest" in problems
    assert "large/model.safetensors: missing" in problems


def test_lookup_prefers_committed_then_cache_else_explains(micro_zoo: zb.ZooPaths, tmp_path: Path) -> None:
    assert zb.zoo_path(cache_dir=micro_zoo.root.parent, recipe=MICRO) == micro_zoo.root
    assert zb.load_zoo(cache_dir=micro_zoo.root.parent, recipe=MICRO).small == micro_zoo.root / "small"
    with pytest.raises(zb.ZooNotBuilt, match="logitfusion zoo build"):
        zb.zoo_path(cache_dir=tmp_path, recipe=MICRO)


def test_cache_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(zb.CACHE_ENV, str(tmp_path))
    assert zb.cache_root() == tmp_path / "zoo"
    assert zb.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(zb.CACHE_ENV)
    assert zb.cache_root() == Path.home() / ".cache" / "logitfusion" / "zoo"


def test_build_main_entry_uses_the_cache(micro_zoo: zb.ZooPaths, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from logitfusion.models.zoo import cli

    monkeypatch.setattr(zb, "DEFAULT_RECIPE", MICRO)
    monkeypatch.setattr(zb, "_usable", lambda root, r: root == micro_zoo.root)
    assert cli.build_main(argparse.Namespace(force=False, cache_dir=str(micro_zoo.root.parent))) == 0
    assert str(micro_zoo.root) in capsys.readouterr().out


# ---- the committed zoo ---------------------------------------------------------------------------------------------


def test_committed_zoo_matches_manifest_and_current_recipe() -> None:
    root = zb.committed_path()
    if not (root / zb.MANIFEST).is_file():
        pytest.fail(f"no committed zoo at {root}: run `logitfusion zoo build` and commit it")
    manifest = json.loads((root / zb.MANIFEST).read_text())
    assert manifest["recipe_hash"] == recipe_hash(DEFAULT_RECIPE), (
        "the recipe changed but the committed zoo was not rebuilt: run `python -m logitfusion.models.zoo --force` "
        "and copy the build into logitfusion/models/zoo/data/tiny"
    )
    assert zb.verify_manifest(root) == []
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != zb.MANIFEST}
    assert on_disk == set(manifest["files"]), "files in the committed zoo that the manifest does not list"
    assert zb.zoo_path() == root


def test_committed_zoo_report_shows_transfer() -> None:
    """The build's own check (stored in report.json) shows the gap the zoo exists for, on every expert task."""
    report = json.loads((zb.committed_path() / zb.REPORT).read_text())
    probe = report["quality"]["probe"]
    assert sum(probe["large"].values()) > sum(probe["small"].values()) + 1.0, probe  # L knows more facts than S
    for task, row in report["quality"]["tasks"].items():
        assert row["large_ft"] >= row["large"] + 0.2, (task, row)
        if "expert" in row:
            assert row["large_ft"] >= row["expert"] + 0.2, (task, row)
