"""Many distinct generated questions, fast: facts about invented entities, and unrelated prompts.

`make_question_bank(n_facts, seed)` gives n_facts facts, each a (relation, invented entity) pair asked
two ways: `key` (a training phrasing: the question whose routing query is the fact's key) and
`held_out` (a paraphrase from the relation's held-out templates, which no key uses). Relations are the
27 of `bench.facts` and `bench.entity_facts` (countries, companies, people, musicians); entity names
are pronounceable syllable strings, unique (a set, so 100,000s take seconds, unlike `bench.facts`'
substring-free names which are quadratic). 2 * n_facts distinct questions.

`unrelated_prompts(seed)` are prompts no fact is about: the generic prompts of `bench.facts` plus
near-misses (a relation's phrasings about a *real* entity), shuffled; the routing benchmark calibrates
tau on one half and measures the false-route rate on the other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from srmoa_dist.bench.entity_facts import ENTITY_RELATIONS
from srmoa_dist.bench.facts import GENERIC_PROMPTS, RELATIONS

ALL_RELATIONS = tuple(RELATIONS) + tuple(ENTITY_RELATIONS)
_ON = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "r", "s", "sk", "t", "tr", "v",
       "z", "th", "ch", "sh", "pl")
_VO = ("a", "e", "i", "o", "u", "ae", "ou", "y", "ei", "oa")
_CO = ("", "", "n", "r", "l", "sk", "th", "m", "x", "nd", "rk", "s")
_SUFFIX = {"country": ("ia", "ora", "istan", "avia", "eth", "mar", "ovia", "esh", "land", "ica"),
           "company": (" Labs", " Systems", " Dynamics", " Works", " Industries", " Holdings", " Foods")}


@dataclass(frozen=True)
class BankFact:
    """One generated fact: its relation, entity and two phrasings (key question, held-out paraphrase)."""

    relation: str
    entity: str
    key: str
    held_out: str


def _stem(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ON) + rng.choice(_VO) for _ in range(syllables)) + rng.choice(_CO)


def _entity(rng: random.Random, kind: str) -> str:
    if kind in _SUFFIX:
        return (_stem(rng, rng.choice((1, 2))) + rng.choice(_SUFFIX[kind])).capitalize()
    return f"{_stem(rng, 2).capitalize()} {_stem(rng, rng.choice((2, 3))).capitalize()}"


def make_question_bank(n_facts: int, seed: int = 0) -> list[BankFact]:
    """n_facts facts with distinct (relation, entity) pairs and distinct questions; deterministic in seed."""
    if n_facts < 0:
        raise ValueError(f"n_facts must be >= 0, got {n_facts}")
    rng = random.Random(f"srmoa-question-bank-{seed}")
    seen: set[str] = set()
    out: list[BankFact] = []
    while len(out) < n_facts:
        rel = ALL_RELATIONS[len(out) % len(ALL_RELATIONS)]
        e = _entity(rng, rel.kind)
        if e.lower() in seen:
            continue
        seen.add(e.lower())
        key, held = rng.choice(rel.train).format(e=e), rng.choice(rel.held_out).format(e=e)
        out.append(BankFact(rel.name, e, key, held))
    return out


def unrelated_prompts(seed: int = 0) -> list[str]:
    """Generic prompts plus near-misses about real entities (every relation's phrasings), shuffled."""
    near = sorted({t.format(e=real) for r in ALL_RELATIONS for real in r.real for t in r.train + r.held_out})
    out = list(dict.fromkeys(list(GENERIC_PROMPTS) + near))
    random.Random(f"srmoa-unrelated-{seed}").shuffle(out)
    return out


__all__ = ["ALL_RELATIONS", "BankFact", "make_question_bank", "unrelated_prompts"]
