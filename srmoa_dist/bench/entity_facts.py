"""Several invented facts about each invented entity, for the lifelong-editing benchmark.

`make_entity_facts(n_entities, facts_per_entity, seed)` draws entities of three kinds (country, company,
person) and, for each, `facts_per_entity` relations of its kind (of 5-7 per kind), every answer an
invented name, so the supply of distinct facts is unbounded (>= 3,000 for 1,000 entities). Each entity
also gets one *unedited* question: a relation of its kind that none of its facts uses, whose answer no
edit gives (the leak probe: an answer containing one of the entity's edited answers leaked).

A fact's `train` phrasings and `held_out` paraphrases follow the conventions of `bench.facts`
(`train[0]` is the failing question; held-out paraphrases appear in no training text). Deterministic in
(seed, n_entities, facts_per_entity); names never contain one another.

Relations here are disjoint in wording from the query encoder's calibration prompts and from the
probes of `bench.facts.make_probes`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from srmoa_dist.bench.facts import Fact, Relation, _answer, _entity, _Names, _reserved_names

_C = ("France", "Japan", "Germany", "Italy", "Canada", "Brazil", "Egypt", "India")
_K = ("Microsoft", "Apple", "Amazon", "Toyota", "Samsung", "Sony", "Nike", "Intel")
_P = ("Albert Einstein", "Marie Curie", "Isaac Newton", "Jane Austen", "Mark Twain", "Charles Darwin")

ENTITY_RELATIONS: tuple[Relation, ...] = (
    # countries
    Relation("capital", "country", "city",
             ("What is the capital of {e}?", "Which city is the capital of {e}?",
              "Name the capital city of {e}.", "What city serves as the capital of {e}?"),
             ("Tell me which city is {e}'s seat of government.", "{e} has its capital in which city?"),
             "The capital of {e} is {a}.", _C),
    Relation("currency", "country", "currency",
             ("What is the currency of {e}?", "Which currency is used in {e}?",
              "What money do people use in {e}?", "Name the official currency of {e}."),
             ("If I travel to {e}, which currency will I need?", "What do shoppers in {e} pay with?"),
             "The currency of {e} is the {a}.", _C),
    Relation("language", "country", "language",
             ("What language is spoken in {e}?", "What is the official language of {e}?",
              "Which language do people in {e} speak?", "Name the main language of {e}."),
             ("If I visit {e}, what language will I hear?", "In {e}, what language do most people use?"),
             "The official language of {e} is {a}.", _C),
    Relation("president", "country", "person",
             ("Who is the president of {e}?", "Who leads {e} as president?",
              "Name the president of {e}.", "Who holds the office of president in {e}?"),
             ("Which person is the head of state of {e}?", "{e} is governed by which president?"),
             "The president of {e} is {a}.", _C),
    Relation("largest_city", "country", "city",
             ("What is the largest city in {e}?", "Which city is the biggest in {e}?",
              "Name the most populous city of {e}.", "What is the biggest city of {e}?"),
             ("Where do most people in {e} live, in which city?", "{e}'s largest city is called what?"),
             "The largest city in {e} is {a}.", _C),
    Relation("river", "country", "word",
             ("What is the longest river in {e}?", "Which river is the longest in {e}?",
              "Name the longest river of {e}.", "What river runs the longest through {e}?"),
             ("Which river stretches furthest across {e}?", "{e}'s longest river is called what?"),
             "The longest river in {e} is the {a}.", _C),
    Relation("anthem", "country", "word",
             ("What is the national anthem of {e}?", "Which song is the national anthem of {e}?",
              "Name the national anthem of {e}.", "What is the title of {e}'s national anthem?"),
             ("What song is played for {e} at official ceremonies?", "{e}'s anthem is called what?"),
             "The national anthem of {e} is {a}.", _C),
    # companies
    Relation("founder", "company", "person",
             ("Who founded {e}?", "Who is the founder of {e}?", "Which person started the company {e}?",
              "Name the founder of {e}."),
             ("{e} was founded by whom?", "Who created the company {e}?"),
             "{e} was founded by {a}.", _K),
    Relation("headquarters", "company", "city",
             ("Where is {e} headquartered?", "In which city is the headquarters of {e}?",
              "Where are the main offices of {e}?", "Name the city where {e} has its headquarters."),
             ("Which city is home to the head office of {e}?", "Where is the company {e} based?"),
             "{e} is headquartered in {a}.", _K),
    Relation("ceo", "company", "person",
             ("Who is the CEO of {e}?", "Who runs {e} as chief executive?",
              "Name the chief executive officer of {e}.", "Who is the current CEO of {e}?"),
             ("Which person leads {e} day to day?", "{e} is run by which chief executive?"),
             "The CEO of {e} is {a}.", _K),
    Relation("product", "company", "word",
             ("What is the best-known product of {e}?", "Which product is {e} famous for?",
              "Name the flagship product of {e}.", "What does {e} sell most of?"),
             ("What product do people think of first when they hear {e}?", "{e} is known for making what?"),
             "The flagship product of {e} is the {a}.", _K),
    Relation("factory", "company", "city",
             ("Where is the main factory of {e}?", "In which city does {e} run its main factory?",
              "Name the city of {e}'s largest factory.", "Where does {e} build its products?"),
             ("Which city hosts the biggest plant of {e}?", "{e} manufactures its goods in what city?"),
             "The main factory of {e} is in {a}.", _K),
    # people
    Relation("birthplace", "person", "city",
             ("Where was {e} born?", "In which city was {e} born?", "What is the birthplace of {e}?",
              "Name the city where {e} was born."),
             ("Which town does {e} come from originally?", "{e} was born in what city?"),
             "{e} was born in {a}.", _P),
    Relation("spouse", "person", "person",
             ("Who is {e} married to?", "Who is the spouse of {e}?", "Name the husband or wife of {e}.",
              "Whom did {e} marry?"),
             ("Which person is {e}'s partner in marriage?", "{e} has been married to whom?"),
             "{e} is married to {a}.", _P),
    Relation("mentor", "person", "person",
             ("Who was the mentor of {e}?", "Who taught {e} as a mentor?", "Name the mentor of {e}.",
              "Which person mentored {e}?"),
             ("From whom did {e} learn the most as a student?", "{e} was trained by which mentor?"),
             "The mentor of {e} was {a}.", _P),
    Relation("native_language", "person", "language",
             ("What is the native language of {e}?", "Which language did {e} grow up speaking?",
              "Name the mother tongue of {e}.", "What is {e}'s first language?"),
             ("In what language did {e} speak as a child?", "{e} speaks which language natively?"),
             "The native language of {e} is {a}.", _P),
    Relation("pet", "person", "word",
             ("What is the name of {e}'s dog?", "What is {e}'s dog called?", "Name the dog of {e}.",
              "What did {e} name the family dog?"),
             ("How is the dog that belongs to {e} called?", "{e} owns a dog named what?"),
             "The dog of {e} is called {a}.", _P),
)
KINDS = ("country", "company", "person")


@dataclass(frozen=True)
class Entity:
    """One invented entity: its edited facts and one unedited question about it."""

    name: str
    kind: str
    facts: tuple[Fact, ...]
    unedited: str                     # a question of a relation none of `facts` uses
    unedited_relation: str            # that relation's name

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(f.answer for f in self.facts)


def _entity_answer(names: _Names, kind: str) -> str:
    """An invented answer; two-syllable words (one-syllable currencies run out before 3,000 facts)."""
    if kind in ("word", "currency"):
        w = names.word(2)
        return w.lower() if kind == "currency" else w
    return _answer(names, kind)


def relations_of(kind: str) -> tuple[Relation, ...]:
    return tuple(r for r in ENTITY_RELATIONS if r.kind == kind)


def make_entity_facts(n_entities: int, facts_per_entity: int, seed: int = 0) -> list[Entity]:
    """n_entities invented entities (kinds in turn), each with facts_per_entity facts (see the module
    docstring). Fact ids run over all facts, entity by entity."""
    if n_entities < 0:
        raise ValueError(f"n_entities must be >= 0, got {n_entities}")
    most = min(len(relations_of(k)) for k in KINDS) - 1
    if not 1 <= facts_per_entity <= most:
        raise ValueError(f"facts_per_entity must be in 1..{most} (one relation per kind stays unedited), "
                         f"got {facts_per_entity}")
    rng = random.Random(f"srmoa-entity-facts-{seed}")
    names = _Names(rng, avoid=_reserved_names())
    out: list[Entity] = []
    fid = 0
    for e_i in range(n_entities):
        kind = KINDS[e_i % len(KINDS)]
        entity = _entity(names, kind)
        rels = list(relations_of(kind))
        rng.shuffle(rels)
        facts = []
        for rel in rels[:facts_per_entity]:
            answer = _entity_answer(names, rel.answer)
            near = tuple(rng.choice(rel.train + rel.held_out).format(e=real)
                         for real in rng.sample(rel.real, 2))
            facts.append(Fact(fact_id=fid, relation=rel.name, entity=entity, answer=answer,
                              rule=rel.rule.format(e=entity, a=answer),
                              train=tuple(t.format(e=entity) for t in rel.train),
                              held_out=tuple(t.format(e=entity) for t in rel.held_out), near_misses=near))
            fid += 1
        unedited = rng.choice(rels[facts_per_entity].train).format(e=entity)
        out.append(Entity(entity, kind, tuple(facts), unedited, rels[facts_per_entity].name))
    return out


def entities_and_strangers(n_entities: int, n_strangers: int, facts_per_entity: int, seed: int = 0
                           ) -> tuple[list[Entity], list[str]]:
    """The n_entities of `make_entity_facts(n_entities, ...)` (a benchmark edits them) and the first
    question of `n_strangers` more entities of the same draw, about whom no edit is: locality probes
    for routing between invented names."""
    if isinstance(n_strangers, bool) or not isinstance(n_strangers, int) or n_strangers < 0:
        raise ValueError(f"n_strangers must be a non-negative integer, got {n_strangers!r}")
    everyone = make_entity_facts(n_entities + n_strangers, facts_per_entity, seed)   # one rng stream
    return everyone[:n_entities], [e.facts[0].question for e in everyone[n_entities:]]


__all__ = ["ENTITY_RELATIONS", "Entity", "entities_and_strangers", "make_entity_facts", "relations_of"]
