"""The zoo's world, tokenizer, tasks and recipe hash: determinism and the knowledge/format split."""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from logitfusion.models.zoo import tasks
from logitfusion.models.zoo.recipe import ZooRecipe, recipe_hash
from logitfusion.models.zoo.tokenizer import build_tokenizer, save_tokenizer
from logitfusion.models.zoo.train import PretrainSpec, pretraining_batches
from logitfusion.models.zoo.world import (
    QUESTION_TEMPLATES,
    RELATIONS,
    WorldSpec,
    make_world,
    number_words,
    pretraining_sentences,
    task_items,
)

SPEC = WorldSpec()


def test_same_seed_same_world_and_corpus() -> None:
    a, b = make_world(SPEC), make_world(SPEC)
    assert a.entities == b.entities and a.facts == b.facts and a.heldout_entities == b.heldout_entities
    sa = list(itertools.islice(pretraining_sentences(a, random.Random(5)), 500))
    sb = list(itertools.islice(pretraining_sentences(b, random.Random(5)), 500))
    assert sa == sb
    other = make_world(dataclasses.replace(SPEC, seed=SPEC.seed + 1))
    assert other.entities != a.entities


def test_packed_batches_are_deterministic() -> None:
    world = make_world(SPEC)
    tok = build_tokenizer(world)
    spec = PretrainSpec(steps=2, batch_rows=4, seq_len_tokens=64)
    first = list(pretraining_batches(world, tok, spec))
    second = list(pretraining_batches(world, tok, spec))
    assert all((x == y).all() for x, y in zip(first, second, strict=True))
    assert first[0].shape == (4, 64)
    assert (first[0][:, 0] == tok.token_to_id("<s>")).all()
    assert int((first[0] == tok.token_to_id("<unk>")).sum()) == 0


def test_world_shape_and_split() -> None:
    w = make_world(SPEC)
    assert len(set(w.entities)) == SPEC.n_entities
    assert set(w.train_entities) | set(w.heldout_entities) == set(w.entities)
    assert not set(w.train_entities) & set(w.heldout_entities)
    assert len(w.heldout_entities) == round(SPEC.heldout_fraction * SPEC.n_entities)
    assert not set(w.train_pairs) & set(w.heldout_pairs)
    assert len(set(w.facts["capital"].values())) == SPEC.n_entities  # capitals are unique
    for rel in RELATIONS:
        assert set(w.facts[rel]) == set(w.entities)


def test_pretraining_states_facts_but_never_asks_questions() -> None:
    w = make_world(SPEC)
    sentences = list(itertools.islice(pretraining_sentences(w, random.Random(0)), 5000))
    assert not any("?" in s for s in sentences)
    assert not any("answer:" in s or "answer :" in s for s in sentences)
    land = w.heldout_entities[0]
    mentioned = [s for s in sentences if land in s.split()]
    assert mentioned, "a held-out land must appear in pre-training"


def test_every_text_tokenizes_without_unknowns() -> None:
    w = make_world(SPEC)
    tok = build_tokenizer(w)
    unk = tok.token_to_id("<unk>")
    texts = list(itertools.islice(pretraining_sentences(w, random.Random(1)), 3000))
    for task in QUESTION_TEMPLATES:
        texts += [f"{it.prompt} {it.answer}" for it in task_items(w, task, "heldout")]
        texts.append(tasks.few_shot_prefix(task, 3))
    for enc in tok.encode_batch(texts):
        assert unk not in enc.ids


def test_tokenizer_round_trip_and_autotokenizer(tmp_path: Path) -> None:
    w = make_world(SPEC)
    save_tokenizer(w, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    land = w.entities[3]
    text = f"{land} was founded in {w.facts['year'][land]}."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.tokenize(w.facts["year"][land])) == 4  # digits: a multi-token answer
    assert tok.tokenize("question:\nanswer") == ["question", ":", "\n", "answer"]


def test_number_words() -> None:
    assert [number_words(n) for n in (0, 13, 20, 47)] == ["zero", "thirteen", "twenty", "forty seven"]
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        number_words(100)


def test_world_spec_validation() -> None:
    with pytest.raises(ValueError, match="n_entities"):
        make_world(dataclasses.replace(SPEC, n_entities=3))
    with pytest.raises(ValueError, match="heldout_fraction"):
        make_world(dataclasses.replace(SPEC, heldout_fraction=1.0))


def test_tasks_api_for_evaluation() -> None:
    assert tasks.task_names() == tasks.expert_tasks() + tasks.unseen_tasks()
    assert len(tasks.expert_tasks()) >= 3 and tasks.unseen_tasks()
    w = make_world(SPEC)
    for task in tasks.task_names():
        items = tasks.eval_items(task)
        assert items and all(it.prompt.endswith("answer:") for it in items)
        train_keys = {it.key for it in tasks.train_items(task)}
        assert not train_keys & {it.key for it in items}, "held-out items must not be fine-tuning items"
        assert len(tasks.eval_items(task, limit=5)) == 5
        prefix = tasks.few_shot_prefix(task, 3)
        assert prefix.count("\n") == 3 and all(line.split("answer:")[1].strip() for line in prefix.splitlines())
        assert tasks.few_shot_prompt(task, items[0].prompt, 3) == prefix + items[0].prompt
        tok = build_tokenizer(w)
        longest = max(len(tok.encode(it.reference, add_special_tokens=False).ids) for it in items)
        assert tasks.max_new_tokens(task) >= longest + 1
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.eval_items("nope")


def test_scoring_rule() -> None:
    ref = "the capital city is velmora"
    assert tasks.score(ref, ref) == 1.0
    assert tasks.score(" The capital  city is Velmora\nquestion: what", ref) == 1.0
    assert tasks.score("the capital city is velmora.", ref) == 0.0  # the format is the bare sentence
    assert tasks.score("the capital city is velmora and the flag is red", ref) == 0.0
    assert tasks.score("velmora", ref) == 0.0
    assert tasks.score("", ref) == 0.0


def test_recipe_hash_tracks_every_field() -> None:
    r = ZooRecipe()
    assert recipe_hash(r) == recipe_hash(ZooRecipe())
    changed = dataclasses.replace(r, world=dataclasses.replace(r.world, n_entities=r.world.n_entities + 1))
    assert recipe_hash(changed) != recipe_hash(r)
    changed = dataclasses.replace(r, pretrain_large=dataclasses.replace(r.pretrain_large, lr=0.123))
    assert recipe_hash(changed) != recipe_hash(r)
