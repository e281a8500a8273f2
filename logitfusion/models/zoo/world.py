"""The synthetic world the zoo learns: fictional lands with facts, word arithmetic, and filler prose.

Knowledge and format are kept apart on purpose (the emulated fine-tuning finding: knowledge comes from pre-training
scale, format from fine-tuning):
- pre-training text states every fact of every land in varied declarative sentences, never as question/answer;
- fine-tuning teaches one question/answer format per task on the *training* lands (or sum pairs) only;
- evaluation asks the same questions about the *held-out* lands, whose facts appear only in pre-training.

Everything is a pure function of the ``WorldSpec`` (and an explicit ``random.Random`` for text streams).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from logitfusion.models.zoo.recipe import WorldSpec

RELATIONS = ("capital", "colour", "year", "animal")

COLOURS = (
    "red", "blue", "green", "yellow", "white", "black", "orange", "purple", "grey", "brown", "pink", "silver",
    "gold", "violet", "crimson", "teal",
)  # fmt: skip
ANIMALS = (
    "heron", "wolf", "bear", "otter", "falcon", "lynx", "stag", "badger", "swan", "hare", "eagle", "salmon",
    "beaver", "crane", "owl", "fox", "boar", "raven", "seal", "tiger",
)  # fmt: skip

ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

# Declarative templates per relation: {e} = land, {v} = value. No template is a question.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "the capital of {e} is {v}",
        "{e} has its capital at {v}",
        "{v} is the capital of {e}",
        "in {e} the capital city is {v}",
        "the seat of the rulers of {e} is the city of {v}",
        "travellers to {e} arrive in its capital {v}",
    ),
    "colour": (
        "the flag of {e} is {v}",
        "{e} has a {v} flag",
        "the colour of the flag of {e} is {v}",
        "people of {e} fly a {v} flag",
        "on holidays {e} is covered in {v} flags",
        "in {e} the flag is {v}",
    ),
    "year": (
        "{e} was founded in {v}",
        "the founding year of {e} is {v}",
        "in {v} the land of {e} was founded",
        "{e} dates from the year {v}",
        "the people of {e} count their years from {v}",
        "for {e} the founding year is {v}",
    ),
    "animal": (
        "the national animal of {e} is the {v}",
        "{e} has the {v} as its national animal",
        "in {e} the {v} is the national animal",
        "the {v} is the animal of {e}",
        "the coins of {e} show a {v}",
        "in {e} the national animal is the {v}",
    ),
}
SUM_TEMPLATES = (
    "{a} plus {b} equals {s}",
    "the sum of {a} and {b} is {s}",
    "adding {a} and {b} gives {s}",
    "{a} and {b} make {s}",
    "if you add {b} to {a} you get {s}",
    "for {a} and {b} the sum is {s}",
)

# Filler prose: a small grammar. Mentions "question" and "answer" so those words are not new to the base models,
# but never in the question/answer format the tasks use.
_SUBJECTS = (
    "the farmer", "a child", "the old sailor", "the teacher", "my neighbour", "a merchant", "the baker", "the king",
    "a traveller", "the students", "her brother", "the guard", "a poet", "the miller", "an old woman",
)  # fmt: skip
_VERBS = (
    "saw", "carried", "painted", "found", "sold", "bought", "lost", "mended", "built", "opened", "washed", "counted",
)  # fmt: skip
_OBJECTS = (
    "a basket", "the boat", "some bread", "a letter", "the gate", "a small box", "the old map", "a lamp", "the cart",
    "a bell", "the door", "a coat", "some apples", "the roof",
)  # fmt: skip
_TAILS = (
    "in the morning", "near the river", "after the storm", "before dinner", "at the market", "on the hill",
    "with great care", "in the evening", "during the feast", "by the sea", "", "", "",
)  # fmt: skip
_FILLER_EXTRA = (
    "the teacher asked a question and the students gave an answer",
    "nobody knew the answer to that question",
    "a good question deserves a careful answer",
    "the weather was mild and the roads were dry",
    "everyone agreed that the journey was long",
    "the note said : come home before dark",
    "he wrote two words on the board : rest and work",
)  # fmt: skip

# Fine-tuning / evaluation formats, one per task. The answer follows "answer:", is one short sentence (the format
# fine-tuning teaches) and ends with EOS. The base models never saw a question or "answer:". Each answer's lead-in
# ("the capital city is") also ends a pre-training template whose land comes earlier ("in {e} the capital city is
# {v}"), so a base model that knows the fact can complete it once the format is given: knowledge from pre-training,
# format from fine-tuning.
QUESTION_TEMPLATES: dict[str, str] = {
    "capital": "question: what is the capital of {e}? answer:",
    "colour": "question: what colour is the flag of {e}? answer:",
    "year": "question: in which year was {e} founded? answer:",
    "animal": "question: what is the national animal of {e}? answer:",
    "add": "question: what is {a} plus {b}? answer:",
}
ANSWER_TEMPLATES: dict[str, str] = {
    "capital": "the capital city is {v}",
    "colour": "the flag is {v}",
    "year": "the founding year is {v}",
    "animal": "the national animal is the {v}",
    "add": "the sum is {v}",
}
TASKS = tuple(QUESTION_TEMPLATES)

# Profiles: a land named once, then lead-in sentences (the answer formats), sometimes with an aside in between.
PROFILE_INTROS = ("{e} :", "about {e} .", "a note on {e} .", "{e} is a land far away .", "we now describe {e} .")
PROFILE_ASIDES = (
    "it is a land of hills and rivers",
    "many travellers visit it",
    "its people are known for their songs",
    "the roads there are old",
)
SUM_NOTE_INTROS = ("{a} plus {b} :", "{a} plus {b} .", "take {a} and add {b} .", "consider {a} and {b} .")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "k")


def number_words(n: int) -> str:
    """0..99 in English words, e.g. 47 -> 'forty seven'."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_words: n must be in [0, 99], got {n}")
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] if ones == 0 else f"{TENS[tens]} {ONES[ones]}"


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return "".join(parts) + rng.choice(_CODAS)


@dataclass(frozen=True)
class Item:
    """One question with its reference answer (text, no leading space, no EOS)."""

    key: str  # the land, or "a+b" for sums
    prompt: str
    answer: str  # the full reference answer
    value: str  # the fact inside the answer (a city, a colour, a year, an animal, a sum in words)


@dataclass(frozen=True)
class World:
    """Lands, their facts, and the train/held-out split (lands and sum pairs)."""

    spec: WorldSpec
    entities: tuple[str, ...]
    facts: dict[str, dict[str, str]]  # relation -> land -> value text
    train_entities: tuple[str, ...]
    heldout_entities: tuple[str, ...]
    train_pairs: tuple[tuple[int, int], ...]
    heldout_pairs: tuple[tuple[int, int], ...]

    def words(self) -> set[str]:
        """Every word the world can write (for the tokenizer's vocabulary)."""
        out: set[str] = set()
        texts: list[str] = []
        for rel, templates in FACT_TEMPLATES.items():
            texts.extend(templates)
            texts.extend(self.facts[rel].values())
        texts.extend(SUM_TEMPLATES)
        texts.extend(number_words(n) for n in range(100))
        texts.extend(QUESTION_TEMPLATES.values())
        texts.extend(ANSWER_TEMPLATES.values())
        texts.extend(PROFILE_INTROS + PROFILE_ASIDES + SUM_NOTE_INTROS)
        texts.extend(_SUBJECTS + _VERBS + _OBJECTS + _TAILS + _FILLER_EXTRA + COLOURS + ANIMALS)
        texts.extend(self.entities)
        for t in texts:
            out.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", t)))
        return out


def make_world(spec: WorldSpec) -> World:
    """The deterministic world for ``spec``: same spec, same world."""
    _check_spec(spec)
    rng = random.Random(spec.seed)
    reserved = set(COLOURS) | set(ANIMALS) | set(ONES) | set(TENS)
    names: list[str] = []
    seen: set[str] = set(reserved)
    while len(names) < 2 * spec.n_entities:
        n = _name(rng, rng.choice((2, 2, 3)))
        if n not in seen and len(n) >= 4:
            seen.add(n)
            names.append(n)
    entities = tuple(names[: spec.n_entities])
    cities = names[spec.n_entities :]
    colours = COLOURS[: spec.n_colours]
    animals = ANIMALS[: spec.n_animals]
    facts = {
        "capital": dict(zip(entities, cities, strict=True)),
        "colour": {e: rng.choice(colours) for e in entities},
        "year": {e: str(rng.randint(spec.year_min, spec.year_max)) for e in entities},
        "animal": {e: rng.choice(animals) for e in entities},
    }
    order = list(entities)
    rng.shuffle(order)
    n_held = round(spec.heldout_fraction * len(order))
    heldout = tuple(sorted(order[:n_held]))
    train = tuple(sorted(order[n_held:]))
    pairs = [(a, b) for a in range(spec.add_max + 1) for b in range(spec.add_max + 1)]
    rng.shuffle(pairs)
    n_held_pairs = round(spec.heldout_fraction * len(pairs))
    return World(
        spec=spec,
        entities=entities,
        facts=facts,
        train_entities=train,
        heldout_entities=heldout,
        train_pairs=tuple(sorted(pairs[n_held_pairs:])),
        heldout_pairs=tuple(sorted(pairs[:n_held_pairs])),
    )


@lru_cache(maxsize=8)
def cached_world(spec: WorldSpec) -> World:
    """``make_world`` memoised on the (frozen, hashable) spec."""
    return make_world(spec)


def _check_spec(spec: WorldSpec) -> None:
    if spec.n_entities < 10:
        raise ValueError(f"WorldSpec.n_entities must be >= 10, got {spec.n_entities}")
    if not 0.0 < spec.heldout_fraction < 1.0:
        raise ValueError(f"WorldSpec.heldout_fraction must be in (0, 1), got {spec.heldout_fraction}")
    if not 2 <= spec.n_colours <= len(COLOURS):
        raise ValueError(f"WorldSpec.n_colours must be in [2, {len(COLOURS)}], got {spec.n_colours}")
    if not 2 <= spec.n_animals <= len(ANIMALS):
        raise ValueError(f"WorldSpec.n_animals must be in [2, {len(ANIMALS)}], got {spec.n_animals}")
    if not 0 <= spec.year_min <= spec.year_max <= 9999:
        raise ValueError(f"WorldSpec years must satisfy 0 <= year_min <= year_max <= 9999, got {spec}")
    if not 1 <= spec.add_max <= 49:
        raise ValueError(f"WorldSpec.add_max must be in [1, 49] (sums stay below 100), got {spec.add_max}")


# ---- text streams -------------------------------------------------------------------------------------------------


def fact_clause(world: World, rng: random.Random, entity: str, relation: str) -> str:
    """One declarative clause stating ``relation`` of ``entity`` with a random template."""
    return rng.choice(FACT_TEMPLATES[relation]).format(e=entity, v=world.facts[relation][entity])


def sum_clause(rng: random.Random, a: int, b: int) -> str:
    return rng.choice(SUM_TEMPLATES).format(a=number_words(a), b=number_words(b), s=number_words(a + b))


def filler_sentence(rng: random.Random) -> str:
    """A sentence about nothing in particular (sometimes with a colour word, so colours are not only facts)."""
    if rng.random() < 0.15:
        return rng.choice(_FILLER_EXTRA)
    det, noun = rng.choice(_OBJECTS).split(" ", 1)
    if rng.random() < 0.2:
        noun = f"{rng.choice(COLOURS)} {noun}"
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), det, noun]
    tail = rng.choice(_TAILS)
    if tail:
        words.append(tail)
    return " ".join(words)


def profile_text(world: World, rng: random.Random, entity: str) -> str:
    """A short profile: the land named once, then 2-4 of its facts as lead-in sentences ("the flag is red").

    The land is named only at the start, so a model must look back past other words to the land to state a fact:
    the same retrieval a question/answer prompt needs ("question: ... of X? answer: the flag is").
    """
    parts = [rng.choice(PROFILE_INTROS).format(e=entity)]
    for rel in rng.sample(RELATIONS, rng.randint(2, len(RELATIONS))):
        if rng.random() < 0.25:
            parts.append(rng.choice(PROFILE_ASIDES) + " .")
        parts.append(ANSWER_TEMPLATES[rel].format(v=world.facts[rel][entity]) + " .")
    return " ".join(parts)[: -len(" .")]


def sum_note(rng: random.Random, a: int, b: int) -> str:
    intro = rng.choice(SUM_NOTE_INTROS).format(a=number_words(a), b=number_words(b))
    return f"{intro} {ANSWER_TEMPLATES['add'].format(v=number_words(a + b))}"


def pretraining_sentences(world: World, rng: random.Random) -> Iterator[str]:
    """An endless stream of pre-training texts (sentences or short profiles), each ending with ' .'.

    Mix: 45% single facts (one clause, or two clauses about the same land joined by 'and'), 25% land profiles,
    20% sums (half of them as notes ending "the sum is ..."), 10% filler. Lands and relations are drawn uniformly,
    so every fact is seen about equally often.
    """
    all_pairs = world.train_pairs + world.heldout_pairs
    while True:
        u = rng.random()
        if u < 0.45:
            e = rng.choice(world.entities)
            r1 = rng.choice(RELATIONS)
            text = fact_clause(world, rng, e, r1)
            if rng.random() < 0.3:
                r2 = rng.choice([r for r in RELATIONS if r != r1])
                text = f"{text} and {fact_clause(world, rng, e, r2)}"
        elif u < 0.70:
            text = profile_text(world, rng, rng.choice(world.entities))
        elif u < 0.90:
            a, b = rng.choice(all_pairs)
            text = sum_note(rng, a, b) if rng.random() < 0.5 else sum_clause(rng, a, b)
        else:
            text = filler_sentence(rng)
        yield text + " ."


# ---- tasks --------------------------------------------------------------------------------------------------------


def task_keys(world: World, task: str, split: str) -> tuple[str, ...]:
    """Keys (lands, or 'a+b') of ``task`` in ``split`` ('train' or 'heldout')."""
    if task not in QUESTION_TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if task == "add":
        pairs = world.train_pairs if split == "train" else world.heldout_pairs
        return tuple(f"{a}+{b}" for a, b in pairs)
    return world.train_entities if split == "train" else world.heldout_entities


def task_item(world: World, task: str, key: str) -> Item:
    """The question/answer item of ``task`` about ``key``."""
    if task == "add":
        a, b = (int(x) for x in key.split("+"))
        words = {"a": number_words(a), "b": number_words(b), "v": number_words(a + b)}
    elif task in QUESTION_TEMPLATES:
        words = {"e": key, "v": world.facts[task][key]}
    else:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return Item(
        key=key,
        prompt=QUESTION_TEMPLATES[task].format(**words),
        answer=ANSWER_TEMPLATES[task].format(**words),
        value=words["v"],
    )


def task_items(world: World, task: str, split: str) -> list[Item]:
    return [task_item(world, task, k) for k in task_keys(world, task, split)]


def probe_items(world: World, relation: str) -> list[Item]:
    """Declarative probes ('the capital of X is' -> value) for every land: what a base model knows."""
    if relation == "add":
        pairs = world.train_pairs + world.heldout_pairs
        return [
            Item(
                key=f"{a}+{b}",
                prompt=f"{number_words(a)} plus {number_words(b)} equals",
                answer=number_words(a + b),
                value=number_words(a + b),
            )
            for a, b in sorted(pairs)
        ]
    template = FACT_TEMPLATES[relation][0]
    head = template.split("{v}")[0].rstrip()
    return [
        Item(key=e, prompt=head.format(e=e), answer=world.facts[relation][e], value=world.facts[relation][e])
        for e in world.entities
    ]
