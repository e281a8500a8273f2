"""The Decoder's per-step helpers.

IncrementalText: the streamed text of a growing sequence equals decoding the whole sequence at once, for real
tokenizers with multi-byte characters split over several tokens (byte-level BPE) and with a first-token rule
(Metaspace drops the leading space of the first token), and each step decodes only a short window.
concat_rows: no copy for rows that already lie back to back.
StepPlan.apply / apply_tokens / ExtendOp.rows: the one definition of what a plan does to per-sequence state, checked
against a real LocalRunner on random plans."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitfusion.engine.decoder import IncrementalText
from logitfusion.engine.runner import ExtendOp, RunnerError, StepPlan
from logitfusion.engine.testing import tiny_runner

CORPUS = [
    "the capital of ondora is vel mar. héllo wörld, naïve café ünïcödé",
    "日本語のテキスト 和 中文 and emoji 🙂🚀 mixed with ascii words",
    "what colour is the flag of bathebrik? answer: the flag is teal",
] * 20


def _byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet))
    return tok


def _metaspace():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return tok


TOKENIZERS = {"byte_level": _byte_level(), "metaspace": _metaspace()}
TEXT = st.text(alphabet=st.sampled_from(sorted(set("".join(CORPUS)))), min_size=0, max_size=60)


def stream(tok, ids: list[int]) -> tuple[str, list[int]]:
    """Feed ids one at a time; returns the streamed text and the window length of every decode call."""
    windows: list[int] = []

    def decode(window):
        windows.append(len(window))
        return tok.decode(list(window))

    inc = IncrementalText(decode)
    out = "".join(inc.step(ids[: i + 1]) for i in range(len(ids)))
    return out + inc.flush(ids), windows


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=60, deadline=None)
@given(text=TEXT)
def test_streamed_text_equals_whole_decode(name: str, text: str) -> None:
    tok = TOKENIZERS[name]
    ids = tok.encode(text).ids
    streamed, _ = stream(tok, ids)
    assert streamed == tok.decode(ids)


def test_multi_byte_characters_wait_for_their_last_byte() -> None:
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode("🙂").ids
    assert len(ids) > 1  # an emoji the merges did not learn: one token per byte
    inc = IncrementalText(lambda w: tok.decode(list(w)))
    parts = [inc.step(ids[: i + 1]) for i in range(len(ids))]
    assert parts[:-1] == [""] * (len(ids) - 1) and parts[-1] == "🙂"
    # flush gives an incomplete character as the whole-sequence decode would (a replacement character)
    inc = IncrementalText(lambda w: tok.decode(list(w)))
    assert inc.step(ids[:1]) == ""
    assert inc.flush(ids[:1]) == tok.decode(ids[:1]) == "\ufffd"


def test_each_step_decodes_a_short_window() -> None:
    """Linear, not quadratic: the windows stay a few tokens long however long the sequence grows."""
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode(" ".join(CORPUS[:12])).ids
    assert len(ids) > 150
    streamed, windows = stream(tok, ids)
    assert streamed == tok.decode(ids)
    assert max(windows) <= 8, max(windows)


def test_concat_rows_views_back_to_back_rows_and_copies_otherwise() -> None:
    import torch

    from logitfusion.engine.runner import concat_rows

    base = torch.arange(24.0).view(6, 4)
    rows = list(base.split([1, 2, 3]))
    same = concat_rows(rows)
    assert torch.equal(same, base) and same.data_ptr() == base.data_ptr()  # no copy
    mid = concat_rows(rows[1:])
    assert torch.equal(mid, base[1:]) and mid.data_ptr() == base[1:].data_ptr()
    swapped = concat_rows([rows[1], rows[0]])  # out of order: a real concatenation
    assert torch.equal(swapped, torch.cat([rows[1], rows[0]])) and swapped.data_ptr() != base.data_ptr()
    gap = concat_rows([base[0:1], base[2:3]])
    assert torch.equal(gap, base[[0, 2]])
    other = torch.zeros(1, 4)
    assert torch.equal(concat_rows([base[5:6], other]), torch.cat([base[5:6], other]))
    cols = base[:, :2]  # not row-contiguous views
    assert torch.equal(concat_rows([cols[:2], cols[2:]]), cols)


def test_fusion_device_auto_follows_what_the_process_sees(monkeypatch) -> None:
    import torch

    from logitfusion.engine.decoder import resolve_fusion_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_fusion_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_fusion_device("auto") == torch.device("cuda")
    assert resolve_fusion_device("cpu") == torch.device("cpu")


# ------------------------------------------------------------------------------------ a plan applied to state


def test_extend_rows_are_all_new_tokens_or_one() -> None:
    assert ExtendOp("a", (1, 2, 3), "all").rows == 3
    assert ExtendOp("a", (1, 2, 3)).rows == 1
    plan = StepPlan(extends=(ExtendOp("a", (1, 2), "all"), ExtendOp("b", (3,)), ExtendOp("c", (4, 5, 6))))
    assert plan.rows_per_extend() == [2, 1, 1]
    assert StepPlan().rows_per_extend() == []


def test_apply_runs_releases_then_truncates_then_extends() -> None:
    before = {"a": 3, "b": 1, "gone": 2}
    plan = StepPlan(
        extends=(ExtendOp("b", (5,)), ExtendOp("c", (6, 7)), ExtendOp("a", (8,))),
        truncates=(("a", 1),),
        releases=("b", "gone", "never-seen"),
    )
    assert plan.apply(before) == {"a": 2, "b": 1, "c": 2}  # b released, then created again by its extend
    assert before == {"a": 3, "b": 1, "gone": 2}  # not changed
    assert StepPlan().apply(before) == before


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"truncates": (("zz", 1),)}, r"^large: truncate of unknown seq_id 'zz'$"),
        ({"releases": ("a",), "truncates": (("a", 1),)}, r"^large: truncate of unknown seq_id 'a'$"),
        ({"truncates": (("a", 5),)}, r"^large: truncate of 'a' to length 5 outside 0\.\.4 \(its cached length\); a truncate never grows"),
        ({"truncates": (("a", -1),)}, r"^large: truncate of 'a' to length -1 outside 0\.\.4"),
        ({"truncates": (("a", 2), ("a", 3))}, r"to length 3 outside 0\.\.2"),  # the second meets the first's result
        ({"extends": (ExtendOp("a", (1,)), ExtendOp("a", (2,)))}, r"^large: seq_id 'a' extended twice in one plan$"),
    ],
)
def test_apply_refuses_what_the_state_cannot_take(plan: dict, message: str) -> None:
    histories = {"a": [1, 2, 3, 4]}
    with pytest.raises(RunnerError, match=message):
        StepPlan(**plan).apply({"a": 4}, "large")
    with pytest.raises(RunnerError, match=message):
        StepPlan(**plan).apply_tokens(histories, "large")
    assert histories == {"a": [1, 2, 3, 4]}  # nothing changed


def test_apply_tokens_mirrors_the_runner_order_in_place() -> None:
    a = [1, 2, 3]
    h = {"a": a, "b": [4], "d": [9, 9]}
    StepPlan(extends=(ExtendOp("b", (5,)), ExtendOp("c", (6,)), ExtendOp("a", (7, 8))), truncates=(("a", 1),),
             releases=("b", "d")).apply_tokens(h)
    assert h == {"a": [1, 7, 8], "b": [5], "c": [6]}
    assert h["a"] is a  # in place: a long history is not copied
    StepPlan(truncates=(("a", 0),)).apply_tokens(h)
    assert h["a"] == []  # truncated to 0: still a live (empty) sequence


def _plans(seq_ids: list[str]):
    """Random plans over a few sequence ids, valid or not (unknown ids, growing truncates, double extends)."""
    ids = st.sampled_from(seq_ids)
    extend = st.tuples(ids, st.integers(1, 3), st.sampled_from(["last", "all"]))
    return st.tuples(
        st.lists(ids, max_size=2),
        st.lists(st.tuples(ids, st.integers(-1, 6)), max_size=2),
        st.lists(extend, max_size=3),
    )


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(_plans(["a", "b", "c"]), min_size=1, max_size=4))
def test_apply_predicts_a_real_runner(steps) -> None:
    """Lengths, refusals and rows: what StepPlan says a plan does is what a LocalRunner does with it."""
    runner = tiny_runner("small", threaded=False)
    histories: dict[str, list[int]] = {}
    try:
        for releases, truncates, extends in steps:
            plan = StepPlan(
                extends=tuple(ExtendOp(s, tuple(range(1, n + 1)), want) for s, n, want in extends),
                truncates=tuple(truncates),
                releases=tuple(releases),
            )
            before = runner.sequences()
            try:
                predicted = plan.apply(before, "small")
            except RunnerError as exc:
                with pytest.raises(RunnerError, match=re.escape(str(exc))):
                    runner.step(plan)
                assert runner.sequences() == before
                continue
            out = runner.step(plan)
            assert runner.sequences() == predicted
            assert [t.shape[0] for t in out] == plan.rows_per_extend()
            plan.apply_tokens(histories)
            assert {s: len(h) for s, h in histories.items()} == predicted
    finally:
        runner.close()
