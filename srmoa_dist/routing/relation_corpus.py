"""A seeded corpus of questions about invented entities, for fitting the query encoder's discriminant.

Each *class* is one (entity, relation) pair asked in four wordings. Fitted on it, a discriminant keeps
what tells one fact from another (the entity *and* the relation) and shrinks what only changes the
wording, so "Which city is X's seat of government?" lands nearer "What is the capital of X?" than
"What is the population of X?" does. Mean-pooled hidden states are dominated by the entity's name
otherwise: a question about X scores alike against every key trained on X.

The relations are disjoint from every benchmark relation (`bench.facts`, `bench.entity_facts`) and from
the probes, so a benchmark measures how the discriminant transfers to relations it never saw.
"""

from __future__ import annotations

import random

# kind -> relations; each relation is four wordings of one question about "{e}"
RELATIONS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "country": (
        ("What is the national dish of {e}?", "Which food is {e}'s national dish?",
         "Name the traditional national dish of {e}.", "What do people in {e} eat as their national dish?"),
        ("What is the highest mountain in {e}?", "Which peak is the tallest in {e}?",
         "Name the highest mountain of {e}.", "What mountain rises highest in {e}?"),
        ("What is the national animal of {e}?", "Which animal is the symbol of {e}?",
         "Name the national animal of {e}.", "What creature represents {e} as its national animal?"),
        ("What is the main export of {e}?", "Which product does {e} export the most?",
         "Name the chief export of {e}.", "What does {e} sell abroad more than anything else?"),
        ("What is the national sport of {e}?", "Which sport is most popular in {e}?",
         "Name the national sport of {e}.", "What game do people in {e} play as their national sport?"),
        ("When did {e} become independent?", "In what year was {e} founded?",
         "What is the founding year of {e}?", "How long ago did {e} gain independence?"),
    ),
    "company": (
        ("What is the slogan of {e}?", "Which motto does {e} use in its ads?",
         "Name the advertising slogan of {e}.", "What tagline is {e} known for?"),
        ("Who is the main competitor of {e}?", "Which company competes most with {e}?",
         "Name the biggest rival of {e}.", "What firm is {e}'s chief competitor?"),
        ("What color is the logo of {e}?", "Which color does {e} use for its logo?",
         "Name the logo color of {e}.", "What is the main color of {e}'s logo?"),
        ("How many employees does {e} have?", "What is the size of the workforce at {e}?",
         "How many people work for {e}?", "Name the number of staff at {e}."),
        ("What is the stock ticker of {e}?", "Under which symbol does {e} trade on the stock market?",
         "Name the ticker symbol of {e}.", "What are the letters of {e}'s stock symbol?"),
        ("Who designed the first product of {e}?", "Which engineer built the first product of {e}?",
         "Name the designer of {e}'s first product.", "Who invented the original product of {e}?"),
    ),
    "person": (
        ("What is the favourite food of {e}?", "Which dish does {e} like most?",
         "Name the favourite meal of {e}.", "What does {e} love to eat?"),
        ("What is the hobby of {e}?", "What does {e} do in their free time?",
         "Name a pastime of {e}.", "Which hobby is {e} known for?"),
        ("Who is the best friend of {e}?", "Which person is closest friends with {e}?",
         "Name the best friend of {e}.", "Whom does {e} call their best friend?"),
        ("Where does {e} work?", "Which company employs {e}?",
         "Name the employer of {e}.", "For which organisation does {e} work?"),
        ("What book did {e} write?", "Which novel is {e} the author of?",
         "Name the best-known book by {e}.", "What is the title of the book {e} wrote?"),
        ("How tall is {e}?", "What is the height of {e}?",
         "How many centimetres tall is {e}?", "Name the height of {e}."),
    ),
    "city": (
        ("Who is the mayor of {e}?", "Which person governs {e} as mayor?",
         "Name the mayor of {e}.", "Who runs the city of {e}?"),
        ("What river flows through {e}?", "Which river crosses the city of {e}?",
         "Name the river of {e}.", "Through {e} runs which river?"),
        ("What is the most famous building in {e}?", "Which landmark is {e} known for?",
         "Name the best-known monument in {e}.", "What building do tourists visit first in {e}?"),
        ("What is the football team of {e}?", "Which club plays football in {e}?",
         "Name the main sports team of {e}.", "What team do people in {e} support?"),
        ("In which country is {e}?", "Which country is the city of {e} in?",
         "Name the country where {e} lies.", "{e} belongs to which country?"),
    ),
    "book": (
        ("Who wrote {e}?", "Who is the author of {e}?",
         "Name the writer of the book {e}.", "Which author published {e}?"),
        ("Who is the main character of {e}?", "Which character is the hero of {e}?",
         "Name the protagonist of {e}.", "Whom is the book {e} about?"),
        ("When was {e} published?", "In what year did {e} come out?",
         "What is the publication year of {e}?", "How old is the book {e}?"),
        ("Where is {e} set?", "In which place does {e} take place?",
         "Name the setting of {e}.", "What city is the story of {e} set in?"),
    ),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _entity(rng: random.Random, kind: str) -> str:
    if kind == "country":
        return _word(rng, 2) + rng.choice(("ia", "land", "stan", "ria"))
    if kind == "company":
        return _word(rng, 2) + rng.choice((" Corp", " Industries", " Labs", " Systems"))
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, 2)}"
    if kind == "book":
        return f"The {_word(rng, 2)} of {_word(rng, 2)}"
    return _word(rng, 2)


def make_relation_corpus(entities_per_kind: int = 20, seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, labels): every relation of every kind for `entities_per_kind` invented entities per kind,
    four wordings each; label = the (entity, relation) class, 0..n_classes-1. Deterministic in the args."""
    if entities_per_kind < 1:
        raise ValueError(f"entities_per_kind must be >= 1, got {entities_per_kind}")
    rng = random.Random(f"srmoa-relation-corpus-{seed}")
    texts: list[str] = []
    labels: list[int] = []
    c = 0
    for kind, relations in RELATIONS.items():
        for _ in range(entities_per_kind):
            e = _entity(rng, kind)
            for wordings in relations:
                texts.extend(w.format(e=e) for w in wordings)
                labels.extend([c] * len(wordings))
                c += 1
    return texts, labels


def relation_labels(entities_per_kind: int = 20) -> list[int]:
    """The relation (not the fact) of each text of `make_relation_corpus(entities_per_kind, seed)`, as
    0..n_relations-1 in `RELATIONS` order: the labels whose within-label spread is pure rewording."""
    if entities_per_kind < 1:
        raise ValueError(f"entities_per_kind must be >= 1, got {entities_per_kind}")
    out: list[int] = []
    first = 0
    for relations in RELATIONS.values():
        for _ in range(entities_per_kind):
            for r, wordings in enumerate(relations):
                out.extend([first + r] * len(wordings))
        first += len(relations)
    return out


def corpus_questions(n: int, seed: int = 0) -> list[str]:
    """n distinct questions, one wording per (entity, relation) class of the corpus, in corpus order:
    real-looking queries that no benchmark asks (seed keys for `srmoa init --seed-kind real`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_kind = -(-n // sum(len(r) for r in RELATIONS.values()))
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        texts, labels = make_relation_corpus(per_kind, seed)
        for t, first in zip(texts, [True] + [a != b for a, b in zip(labels[1:], labels)]):
            if first and t not in seen:
                seen.add(t)
                out.append(t)
        per_kind *= 2                     # repeated names: a bigger corpus (same prefix, same seed)
    return out[:n]


__all__ = ["RELATIONS", "corpus_questions", "make_relation_corpus", "relation_labels"]
