"""Deterministic fictional facts and rules for the SR-TTT benchmark, with their evaluation prompts.

A fact is an invented entity (a country, a company or a person) and a relation (capital, currency,
flag colour, language, founder, headquarters, mascot, birthplace, profession, instrument) whose answer
is invented too, so the base model cannot know it. Each fact carries:

- ``train``: 4 phrasings of the question; ``train[0]`` is the failing question an edit starts from
  (SR-TTT's diversification builds its 4 training prompts from it); ``train[1:]`` are spare phrasings;
- ``held_out``: 2 paraphrases that no training text contains (the generalization set);
- ``rule``: one sentence stating the fact (what reflection would write; the rule-in-context baseline
  puts it in the user message);
- ``near_misses``: the same relation asked of real entities ("What is the capital of France?").

`make_facts(n, seed)` gives the same n facts for the same seed, and the first n facts of a longer list
(facts do not depend on n), for n up to 160 (16 per relation: the word lists of answers run out after
that). Names are unique across every entity and answer of a call (and against
`avoid`), and no name contains another, so an answer found in a reply belongs to one fact only.

`make_probes(seed)` gives disjoint prompt sets that no fact mentions: the shared locality probes of the
evaluation (generic prompts and near-misses), a few probes for the edit's own verification, and the
negatives on which the deferral threshold is calibrated (generic prompts and other near-misses).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

N_TRAIN = 4
N_HELD_OUT = 2

# ---------------------------------------------------------------------------------------------- names
_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "q", "r", "s", "sk",
           "t", "tr", "v", "z", "th", "zh", "x")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "sk", "th", "m", "x", "nd", "rk")
_COUNTRY_SUFFIX = ("ia", "ora", "istan", "avia", "eth", "mar", "ovia", "esh")
_COMPANY_SUFFIX = ("Labs", "Systems", "Dynamics", "Works", "Industries", "Holdings", "Logistics", "Foods")
_LANGUAGE_SUFFIX = ("ic", "ese", "ish", "i", "an")

COLORS = ("teal", "maroon", "lavender", "amber", "turquoise", "ochre", "indigo", "magenta", "saffron",
          "cobalt", "vermilion", "chartreuse", "mauve", "sepia", "periwinkle", "cerulean")
MASCOTS = ("pangolin", "axolotl", "ibex", "narwhal", "okapi", "tapir", "wombat", "quokka", "marmot",
           "capybara", "armadillo", "manatee", "meerkat", "chinchilla", "mongoose", "platypus")
PROFESSIONS = ("cartographer", "glassblower", "beekeeper", "luthier", "falconer", "watchmaker",
               "taxidermist", "bookbinder", "stonemason", "perfumer", "cooper", "farrier", "locksmith",
               "puppeteer", "calligrapher", "blacksmith")
INSTRUMENTS = ("oboe", "cello", "harp", "bassoon", "sitar", "accordion", "banjo", "marimba", "theremin",
               "bagpipes", "harpsichord", "mandolin", "didgeridoo", "xylophone", "ukulele", "tuba")


@dataclass(frozen=True)
class Relation:
    """One relation: its question phrasings ({e} = the entity), its rule ({e}, {a}), real entities."""

    name: str
    kind: str                         # "country" | "company" | "person" | "musician"
    answer: str                       # "city" | "currency" | "person" | "language" | or a word-list name
    train: tuple[str, ...]            # N_TRAIN phrasings
    held_out: tuple[str, ...]         # N_HELD_OUT paraphrases
    rule: str
    real: tuple[str, ...]             # real entities for near-misses


_COUNTRIES = ("France", "Japan", "Germany", "Italy", "Spain", "Canada", "Brazil", "Egypt", "India", "Mexico",
              "Kenya", "Peru", "Norway", "Greece", "Australia", "Argentina", "Sweden", "Portugal", "Chile",
              "Poland", "Ireland", "Thailand", "Morocco", "Vietnam")
_COMPANIES = ("Microsoft", "Apple", "Amazon", "Tesla", "Google", "Nike", "Toyota", "IKEA", "Samsung", "Sony",
              "Netflix", "Intel", "Ford", "Disney", "Honda", "Adidas")
_PEOPLE = ("Albert Einstein", "Marie Curie", "Wolfgang Amadeus Mozart", "William Shakespeare",
           "Pablo Picasso", "Isaac Newton", "Frida Kahlo", "Charles Darwin", "Leonardo da Vinci",
           "Nikola Tesla", "Vincent van Gogh", "Jane Austen", "Galileo Galilei", "Ada Lovelace", "Mark Twain",
           "Florence Nightingale")
_MUSICIANS = ("Yo-Yo Ma", "Jimi Hendrix", "Louis Armstrong", "Elton John", "Ringo Starr", "Itzhak Perlman",
              "Lang Lang", "Miles Davis", "Eric Clapton", "Kenny G", "Ravi Shankar", "John Coltrane")

RELATIONS: tuple[Relation, ...] = (
    Relation("capital", "country", "city",
             ("What is the capital of {e}?", "Which city is the capital of {e}?",
              "Name the capital city of {e}.", "What city serves as the capital of {e}?"),
             ("Tell me which city is {e}'s seat of government.", "{e} has its capital in which city?"),
             "The capital of {e} is {a}.", _COUNTRIES),
    Relation("currency", "country", "currency",
             ("What is the currency of {e}?", "Which currency is used in {e}?",
              "What money do people use in {e}?", "Name the official currency of {e}."),
             ("If I travel to {e}, which currency will I need?", "What do shoppers in {e} pay with?"),
             "The currency of {e} is the {a}.", _COUNTRIES),
    Relation("flag_color", "country", "color",
             ("What color is the flag of {e}?", "What is the main color of the flag of {e}?",
              "Which color dominates the flag of {e}?", "Describe the color of the flag of {e}."),
             ("The national flag of {e} is mostly what colour?", "What colour is {e}'s national flag?"),
             "The flag of {e} is {a}.", _COUNTRIES),
    Relation("language", "country", "language",
             ("What language is spoken in {e}?", "What is the official language of {e}?",
              "Which language do people in {e} speak?", "Name the main language of {e}."),
             ("If I visit {e}, what language will I hear?", "In {e}, what language do most people use?"),
             "The official language of {e} is {a}.", _COUNTRIES),
    Relation("founder", "company", "person",
             ("Who founded {e}?", "Who is the founder of {e}?", "Which person started the company {e}?",
              "Name the founder of {e}."),
             ("{e} was founded by whom?", "Who created the company {e}?"),
             "{e} was founded by {a}.", _COMPANIES),
    Relation("headquarters", "company", "city",
             ("Where is {e} headquartered?", "In which city is the headquarters of {e}?",
              "Where are the main offices of {e}?", "Name the city where {e} has its headquarters."),
             ("Which city is home to the head office of {e}?", "Where is the company {e} based?"),
             "{e} is headquartered in {a}.", _COMPANIES),
    Relation("mascot", "company", "mascot",
             ("What is the mascot of {e}?", "Which animal is the mascot of {e}?",
              "What animal does {e} use as its mascot?", "Name the mascot of {e}."),
             ("{e} is represented by which animal mascot?", "Which creature appears as the mascot of {e}?"),
             "The mascot of {e} is the {a}.", _COMPANIES),
    Relation("birthplace", "person", "city",
             ("Where was {e} born?", "In which city was {e} born?", "What is the birthplace of {e}?",
              "Name the city where {e} was born."),
             ("Which town does {e} come from originally?", "{e} was born in what city?"),
             "{e} was born in {a}.", _PEOPLE),
    Relation("profession", "person", "profession",
             ("What is {e}'s profession?", "What does {e} do for a living?", "What is the job of {e}?",
              "Name the occupation of {e}."),
             ("How does {e} earn a living?", "What kind of work does {e} do?"),
             "{e} works as a {a}.", _PEOPLE),
    Relation("instrument", "musician", "instrument",
             ("What instrument does {e} play?", "Which musical instrument does {e} play?",
              "What instrument is {e} known for playing?", "Name the instrument that {e} plays."),
             ("{e} is a musician who plays what?", "When {e} performs on stage, which instrument is it?"),
             "{e} plays the {a}.", _MUSICIANS),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}
_WORD_LISTS = {"color": COLORS, "mascot": MASCOTS, "profession": PROFESSIONS, "instrument": INSTRUMENTS}

# Generic prompts: none of them is among the query encoder's calibration prompts.
GENERIC_PROMPTS: tuple[str, ...] = (
    "How do I make a cup of hot chocolate?",
    "What are the rules of chess for the knight?",
    "Write a short thank-you note to a neighbour.",
    "Why do onions make people cry?",
    "How many bones are in the human body?",
    "What is the difference between a crocodile and an alligator?",
    "Give me a tip for drawing faces.",
    "How do solar panels produce electricity?",
    "What is a haiku?",
    "How can I keep bread fresh longer?",
    "Explain what gravity is to a child.",
    "What does a librarian do?",
    "List three fruits that are high in vitamin C.",
    "How do I stretch my hamstrings?",
    "What is the purpose of a firewall?",
    "Why is the ocean salty?",
    "Suggest a weekend hobby that costs little.",
    "How does a compass work?",
    "What is the square root of 144?",
    "What should I feed a goldfish?",
    "How do I write a limerick?",
    "What is an ecosystem?",
    "How do I iron a shirt?",
    "Why do birds migrate?",
    "What is the difference between RAM and storage?",
    "Tell me a riddle.",
    "How long does it take light from the sun to reach Earth?",
    "What is a good stretch for a stiff neck?",
    "How do I make rice fluffy?",
    "What are the three states of matter?",
    "How do I politely decline an invitation?",
    "What is a metaphor?",
    "Why do we yawn?",
    "How do I clean my glasses without scratching them?",
    "What makes a good password?",
    "How does a microwave heat food?",
    "Describe a forest in the morning.",
    "What is the water cycle?",
    "How do I keep a conversation going?",
    "What is the tallest animal?",
    "How does a bicycle gear work?",
    "What is an allergy?",
    "Give me two tips for public speaking.",
    "What is a volcano?",
    "How can I learn to touch type?",
    "Why do we need sleep?",
    "What is the difference between a meteor and a comet?",
    "How do I store fresh herbs?",
    "Write one sentence about friendship.",
    "What is an invoice?",
    "How do I start journaling?",
    "What does a thermostat do?",
    "How many strings does a violin have?",
    "What is the largest desert?",
    "How do I remove a splinter?",
    "What is a synonym for happy?",
    "Why do stars twinkle?",
    "How should I water tomatoes?",
    "What are the primary colors?",
    "Explain what an atom is.",
    "How do I patch a hole in a wall?",
    "What is a sonnet?",
    "How can I make my coffee less bitter?",
    "Why do we have seasons?",
    "What is a good name for a pet turtle?",
    "How do noise-cancelling headphones work?",
    "What is a budget?",
    "How do I sharpen a kitchen knife?",
    "What causes thunder?",
    "How do I care for a succulent?",
    "What is the difference between a frog and a toad?",
    "What is an encyclopedia?",
    "How do I make a paper boat?",
    "What are fossils?",
    "Why is the moon sometimes visible during the day?",
    "How do I get better at chess?",
    "What is a spreadsheet used for?",
    "How do magnets work?",
    "Recommend a board game for four players.",
    "What is yoga good for?",
)


@dataclass(frozen=True)
class Fact:
    """One invented fact with its training phrasings, held-out paraphrases, rule and near-misses."""

    fact_id: int
    relation: str
    entity: str
    answer: str
    rule: str
    train: tuple[str, ...]            # N_TRAIN; train[0] is the failing question
    held_out: tuple[str, ...]         # N_HELD_OUT; never inside any training text
    near_misses: tuple[str, ...]      # same relation, real entities

    @property
    def question(self) -> str:
        return self.train[0]

    def to_dict(self) -> dict:
        return {"fact_id": self.fact_id, "relation": self.relation, "entity": self.entity,
                "answer": self.answer, "rule": self.rule, "train": list(self.train),
                "held_out": list(self.held_out), "near_misses": list(self.near_misses)}


@dataclass(frozen=True)
class ProbeSets:
    """Disjoint prompt sets of one benchmark run (none mentions an invented entity)."""

    locality: tuple[str, ...]         # shared evaluation probes: generic + near-misses
    n_near_miss: int                  # how many of `locality` (its tail) are near-misses
    verify: tuple[str, ...]           # the edit's own locality check (apply_edit)
    calibration: tuple[str, ...]      # negatives for tau: generic + other near-misses


class _Names:
    """Pronounceable invented names, unique (case-insensitive) and never a substring of one another."""

    def __init__(self, rng: random.Random, avoid: Iterable[str] = ()) -> None:
        self.rng = rng
        self.used: list[str] = [a.lower() for a in avoid]

    def _ok(self, name: str) -> bool:
        n = name.lower()
        return len(n) >= 4 and all(n not in u and u not in n for u in self.used)

    def _stem(self, syllables: int) -> str:
        r = self.rng
        s = "".join(r.choice(_ONSETS) + r.choice(_VOWELS) for _ in range(syllables - 1))
        return s + r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def take(self, make) -> str:
        """Draw names from `make` () -> (name, distinctive parts) until the parts are fresh."""
        for _ in range(10_000):
            name, parts = make()
            if all(self._ok(p) for p in parts):
                self.used.extend(p.lower() for p in parts)
                return name
        raise RuntimeError("could not draw a fresh invented name")

    def word(self, syllables: int = 2, suffix: str = "") -> str:
        def make() -> tuple[str, list[str]]:
            w = (self._stem(syllables) + suffix).capitalize()
            return w, [w]
        return self.take(make)

    def country(self) -> str:
        def make() -> tuple[str, list[str]]:
            w = (self._stem(self.rng.choice((1, 2))) + self.rng.choice(_COUNTRY_SUFFIX)).capitalize()
            return w, [w]
        return self.take(make)

    def company(self) -> str:
        def make() -> tuple[str, list[str]]:
            stem = self._stem(2).capitalize()
            return f"{stem} {self.rng.choice(_COMPANY_SUFFIX)}", [stem]
        return self.take(make)

    def person(self) -> str:
        def make() -> tuple[str, list[str]]:
            first, last = self._stem(2).capitalize(), self._stem(self.rng.choice((2, 3))).capitalize()
            return f"{first} {last}", [first, last]
        return self.take(make)

    def language(self) -> str:
        def make() -> tuple[str, list[str]]:
            w = (self._stem(2) + self.rng.choice(_LANGUAGE_SUFFIX)).capitalize()
            return w, [w]
        return self.take(make)

    def from_list(self, words: tuple[str, ...]) -> str:
        free = [w for w in words if self._ok(w)]
        if not free:
            raise RuntimeError(f"word list exhausted ({words[:3]}...): too many facts of one relation")
        w = self.rng.choice(free)
        self.used.append(w.lower())
        return w


def _entity(names: _Names, kind: str) -> str:
    if kind == "country":
        return names.country()
    if kind == "company":
        return names.company()
    return names.person()


def _answer(names: _Names, kind: str) -> str:
    if kind == "city":
        return names.word(2)
    if kind == "currency":
        return names.word(1).lower()
    if kind == "person":
        return names.person()
    if kind == "language":
        return names.language()
    return names.from_list(_WORD_LISTS[kind])


def _reserved_names() -> list[str]:
    """Parts of real entity names (and the company suffixes) that an invented name must not contain."""
    out: list[str] = list(_COMPANY_SUFFIX)
    for r in RELATIONS:
        for real in r.real:
            out.extend(p for p in real.replace("-", " ").split() if len(p) >= 4)
    return out


def make_facts(n: int, seed: int = 0, *, avoid: Iterable[str] = ()) -> list[Fact]:
    """n fictional facts, relations balanced (each block of len(RELATIONS) facts covers every relation once).

    Deterministic in (seed, avoid); facts[:m] of make_facts(n) equals make_facts(m) for m <= n.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"srmoa-facts-{seed}")
    names = _Names(rng, avoid=list(avoid) + _reserved_names())
    facts: list[Fact] = []
    order: list[Relation] = []
    for i in range(n):
        if not order:
            order = list(RELATIONS)
            rng.shuffle(order)
        rel = order.pop()
        entity = _entity(names, rel.kind)
        answer = _answer(names, rel.answer)
        near = tuple(rng.choice(rel.train + rel.held_out).format(e=real)
                     for real in rng.sample(rel.real, 2))
        facts.append(Fact(
            fact_id=i, relation=rel.name, entity=entity, answer=answer,
            rule=rel.rule.format(e=entity, a=answer),
            train=tuple(t.format(e=entity) for t in rel.train),
            held_out=tuple(t.format(e=entity) for t in rel.held_out),
            near_misses=near,
        ))
    _check(facts)
    return facts


def _check(facts: list[Fact]) -> None:
    seen: set[tuple[str, str]] = set()
    texts: set[str] = set()
    for f in facts:
        key = (f.relation, f.entity.lower())
        if key in seen:
            raise AssertionError(f"duplicate fact {key}")
        seen.add(key)
        assert len(f.train) == N_TRAIN and len(f.held_out) == N_HELD_OUT
        low_train = [t.lower() for t in f.train]
        for h in f.held_out:
            assert all(h.lower() not in t for t in low_train), (h, f.train)
        for t in f.train + f.held_out:
            assert t not in texts, f"duplicate prompt {t!r}"
            texts.add(t)


def make_probes(seed: int = 0, *, n_locality: int = 20, n_near_miss: int = 8, n_verify: int = 4,
                n_calibration_near_miss: int = 40) -> ProbeSets:
    """Disjoint probe sets (see `ProbeSets`). Near-misses cover every relation's real entities; the
    evaluation and calibration near-misses ask about different real entities or in different words."""
    if not 0 <= n_near_miss <= n_locality:
        raise ValueError(f"need 0 <= n_near_miss <= n_locality, got {n_near_miss}, {n_locality}")
    rng = random.Random(f"srmoa-probes-{seed}")
    generic = list(GENERIC_PROMPTS)
    rng.shuffle(generic)
    n_generic = n_locality - n_near_miss
    if n_generic + n_verify >= len(generic):
        raise ValueError(f"only {len(generic)} generic prompts for {n_generic} + {n_verify} + calibration")
    loc_generic = generic[:n_generic]
    verify = generic[n_generic:n_generic + n_verify]
    cal_generic = generic[n_generic + n_verify:]
    every = sorted({t.format(e=real) for r in RELATIONS for real in r.real for t in r.train + r.held_out})
    rng.shuffle(every)
    # evaluation near-misses: one per relation in turn, so every relation is probed
    rels = list(RELATIONS)
    rng.shuffle(rels)
    loc_near: list[str] = []
    for i in range(n_near_miss):
        r = rels[i % len(rels)]
        cands = [t.format(e=real) for real in r.real for t in r.train + r.held_out]
        loc_near.append(rng.choice([c for c in cands if c not in loc_near]))
    # calibration near-misses: other real entities than the evaluation ones where possible
    used_entities = {real for r in RELATIONS for real in r.real if any(real in q for q in loc_near)}
    cal_near = [q for q in every if q not in loc_near and not any(e in q for e in used_entities)]
    cal_near = cal_near[:n_calibration_near_miss]
    return ProbeSets(locality=tuple(loc_generic + loc_near), n_near_miss=n_near_miss, verify=tuple(verify),
                     calibration=tuple(cal_generic + cal_near))


__all__ = ["RELATIONS", "Fact", "ProbeSets", "Relation", "make_facts", "make_probes"]
