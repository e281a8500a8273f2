import json

import pytest

from logitfusion.eval.metrics import format_table, gap_closed, make_rows, pgr, score_ratio, write_json


def test_ratios_match_their_definitions():
    # large base 0.2, expert 0.4, large fine-tuned 0.8, fused 0.6
    assert gap_closed(0.6, 0.2, 0.8) == pytest.approx(4 / 6)
    assert score_ratio(0.6, 0.8) == pytest.approx(0.75)
    assert pgr(0.6, 0.4, 0.8) == pytest.approx(0.5)


def test_undefined_ratios_are_none_not_huge():
    assert gap_closed(0.5, 0.3, 0.3) is None
    assert score_ratio(0.5, 0.0) is None
    assert pgr(0.5, 0.8, 0.8) is None


def test_rows_table_and_json(tmp_path):
    acc = {"large_base": 0.1, "expert": 0.3, "large_finetuned": 0.9, "dlf_newton": 0.7}
    rows = make_rows("capital", acc, 50, settings={"dlf_newton": "single"})
    by = {r.method: r for r in rows}
    assert by["large_base"].gap_closed == pytest.approx(0.0)
    assert by["large_finetuned"].gap_closed == pytest.approx(1.0)
    assert by["dlf_newton"].gap_closed == pytest.approx(0.75)
    assert by["dlf_newton"].pgr == pytest.approx(4 / 6)
    table = format_table(rows)
    assert "| capital | single | dlf_newton | 70.0% | 75.0% | 77.8% | 66.7% | 50 |" in table
    out = tmp_path / "r.json"
    write_json(rows, out)
    data = json.loads(out.read_text())
    assert [d["method"] for d in data] == list(acc)
    assert set(data[0]) >= {"task", "method", "accuracy", "gap_closed", "score_ratio", "pgr"}


def test_missing_reference_method_is_named():
    with pytest.raises(ValueError, match="large_finetuned"):
        make_rows("capital", {"large_base": 0.1}, 10)
