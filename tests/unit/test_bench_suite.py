"""Smoke tests of the benchmark code paths on tiny models with tiny iteration counts (no timing asserts).

What they do check is what the benchmarks rely on being right: greedy speculative output equals plain fused output,
the Decoder's tokens equal the sequential reference loop's, a draft that agrees by construction is always accepted,
and the JSON/markdown output carries every section.
"""

from __future__ import annotations

import io
import json

import pytest

from bench.common import Section, SuiteConfig, markdown_table, render
from bench.suite import SECTION_KEYS, main, parse_sections, run_suite

pytestmark = pytest.mark.timeout(300)


def tiny_config(**changes) -> SuiteConfig:
    base = SuiteConfig.quick_config().with_(
        distributed=False, zoo=False, main_batches=(1, 2), throughput_batches=(1, 2), solver_vocab=1024,
        pack_batches=(2,), pack_steps=2, vocab_sizes=(2048,), vocab_batches=(1, 2),
    )
    return base.with_(**changes)


@pytest.fixture(scope="module")
def doc():
    out = io.StringIO()
    d = run_suite(tiny_config(), parse_sections("a,b,c,d,e,f,g,h,i,j"), out=out)
    d["_printed"] = out.getvalue()
    return d


def test_every_section_is_in_the_json_and_printed_once(doc):
    assert list(doc["sections"]) == list(SECTION_KEYS.values())
    for key, sec in doc["sections"].items():
        assert doc["_printed"].count(f"### {key}:") == 1
        assert len(sec["loadavg_before"]) == 3 and sec["wall_s"] >= 0
        for row in sec["rows"]:
            assert set(sec["columns"]) <= set(row), (key, row)
    assert doc["machine"]["torch_threads"] == 1
    json.dumps(doc)  # serialisable as written by --json


def test_speculative_rows_are_token_identical_and_agreeing_drafts_are_always_accepted(doc):
    rows = doc["sections"]["a_speculative"]["rows"]
    assert {r["models"] for r in rows} == {"random", "agreeing (flat L, S heads)"}
    assert all(r["identical"] for r in rows)
    for r in rows:
        if r["models"].startswith("agreeing"):
            assert r["acceptance"] == 1.0
            assert r["tokens_per_spec_step"] > 1.0
        else:
            assert r["acceptance"] < 0.5  # independent random models agree about as often as chance
    assert any("zoo" in s for s in doc["sections"]["a_speculative"]["skipped"])


def test_baseline_loop_and_decoder_agree(doc):
    rows = doc["sections"]["e_baseline"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["identical"] for r in rows)


def test_orchestration_and_solver_rows(doc):
    b = doc["sections"]["b_orchestration"]
    assert {(r["mode"], r["recipe"], r["batch"]) for r in b["rows"]} == {
        ("in-process", rec, bs) for rec in ("proxy_tuning", "dlf-newton") for bs in (1, 2)
    }
    assert all(r["efficiency"] > 0 and r["sum_fwd_cpu_ms"] > 0 and r["step_cpu_ms"] > 0 for r in b["rows"])
    assert any("distributed" in s for s in b["skipped"])
    c = doc["sections"]["c_solver_share"]["rows"]
    assert {(r["solver"], r["experts"]) for r in c} == {(s, t) for s in ("grid", "newton", "joint") for t in (1, 2)}
    assert doc["sections"]["f_distributed"]["rows"] == []
    assert doc["sections"]["f_distributed"]["skipped"]


def test_throughput_rows_cover_the_batches(doc):
    rows = doc["sections"]["d_throughput"]["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["fused_tok_s"] > 0 and r["large_alone_tok_s"] > 0 for r in rows)


def test_vocab_step_rows_cover_every_recipe_and_ratio(doc):
    rows = doc["sections"]["h_vocab_step"]["rows"]
    assert [(r["V"], r["batch"]) for r in rows] == [(2048, 1), (2048, 2)]
    for r in rows:
        assert all(r[f"{k}_ms"] > 0 for k in ("large_alone", "proxy_1e", "static_3e", "newton_1e", "grid_3e",
                                              "joint_3e", "floor"))
        assert r["newton1e_over_proxy"] > 0 and r["static_fusion_over_floor"] is not None


def test_peer_section_is_skipped_with_the_reason_without_its_env(doc, monkeypatch):
    sec = doc["sections"]["i_peer"]
    if sec["rows"]:  # LOGITFUSION_PEER_DIR was set for this run: then the outputs must match
        assert all(r["identical"] != "NO" for r in sec["rows"])
    else:
        assert any("LOGITFUSION_PEER_DIR" in s for s in sec["skipped"])


def test_fusion_vocab_section_has_rows_and_ratios(doc):
    sec = doc["sections"]["j_fusion_vocab"]
    assert sec["rows"] and "ratios" in sec["extra"]


def test_parse_sections_orders_and_refuses_unknown_letters():
    assert parse_sections("c, a") == ["a", "c"]
    with pytest.raises(ValueError, match="--sections"):
        parse_sections("a,z")
    with pytest.raises(ValueError, match="--sections"):
        parse_sections(" , ")


def test_render_shows_rows_notes_and_skips():
    sec = Section(key="x", title="t", columns=["a", "b"], rows=[{"a": 1, "b": 0.12345}, {"a": None, "b": 123.4}],
                  notes=["n1"], skipped=["s1"])
    text = render(sec)
    assert "| 1 | 0.123 |" in text and "| - | 123.4 |" in text
    assert "- note: n1" in text and "- skipped: s1" in text
    assert markdown_table(["a"], []).count("\n") == 1


def test_main_writes_the_json(tmp_path, capsys):
    path, md = tmp_path / "sub" / "bench.json", tmp_path / "bench.md"
    assert main(["--quick", "--sections", "g", "--no-distributed", "--no-zoo", "--json", str(path),
                 "--markdown", str(md)]) == 0
    doc = json.loads(path.read_text())
    assert "### g_local_pack:" in md.read_text()
    assert list(doc["sections"]) == ["g_local_pack"]
    assert doc["config"]["quick"] is True
    assert "g_local_pack" in capsys.readouterr().out


def test_gpu_bench_code_paths_on_the_cpu(tmp_path):
    from bench import gpu

    assert gpu.main(["--tiny", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert set(doc["tables"]) == {"forward", "decode", "speculative", "solver"}
    assert doc["bandwidth_gb_s"] > 0
    spec = doc["tables"]["speculative"]
    assert all(r["identical"] for r in spec)
    assert all(r["acceptance"] == 1.0 for r in spec if r["heads"].startswith("flat"))
    assert {r["recipe"] for r in doc["tables"]["decode"]} == {
        "large alone", "static-1", "dlf-newton-1", "static-2", "dlf-newton-2",
        "dlf-newton-1 @cpu", "dlf-newton-2 @cpu",  # the fusion_device rows (on a GPU: "@cuda")
    }
    assert (tmp_path / "gpu.md").read_text().startswith("## GPU benchmark")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_distributed_rows_on_local_ray():
    pytest.importorskip("ray")
    d = run_suite(tiny_config(distributed=True, rtt_repeats=5), parse_sections("b,f"), out=io.StringIO())
    b = d["sections"]["b_orchestration"]
    assert {r["mode"] for r in b["rows"]} == {"in-process", "distributed"}, b["skipped"]
    f = d["sections"]["f_distributed"]
    assert [r["batch"] for r in f["rows"]] == [1, 2]
    assert all(r["dist_step_ms"] > 0 and r["ratio"] > 0 for r in f["rows"])
    rtt = f["extra"]["stream_round_trip_ms (empty plan, median)"]
    assert set(rtt) == {"large", "small", "expert_0"}


def test_speculative_rows_on_the_committed_zoo_are_token_identical():
    from bench.models import find_zoo

    zoo, why = find_zoo()
    if zoo is None:
        pytest.skip(f"no zoo matching the recipe: {why}")
    d = run_suite(tiny_config(zoo=True), ["a"], out=io.StringIO())
    rows = [r for r in d["sections"]["a_speculative"]["rows"] if r["models"].startswith("zoo")]
    assert [r["recipe"] for r in rows] == ["proxy_tuning", "dlf-newton"]
    assert all(r["identical"] and r["draft"] == "expert_capital" for r in rows)
    assert all(0.0 <= r["acceptance"] <= 1.0 for r in rows)
