"""Contrast prompts: other questions about the failing question's subject, that an edit must not take.

An edit's key is trained to win its own prompts' queries. Queries pooled over the user's tokens are
dominated by a rare subject name, so an *unedited* question about the same subject ("Who is the CEO of
X?" next to an edit of X's founder) scores nearly as high, passes tau, and reaches the edited expert,
which then answers with the edited fact (a leak). The contrast prompts are generic questions about the
same subject (`CONTRAST_TEMPLATES`, worded unlike any relation of the benchmarks); the trainer puts
their queries in the router loss with the deferral column as the label, so the key moves toward what
the edit is about (the relation) and away from what is only shared (the subject).

They are used two ways: as *rows* of the training batch whose target is the base model's own first
sentence to them (the expert learns to leave other questions about the subject to the base model:
`ttt.contrast_prompts`), and optionally in the router loss with the deferral column as the label
(`ttt.contrast_weight`; measured to cut leaks but also the held-out paraphrases' routing, so off by default).

`relation_questions` draws other contrast prompts from `routing.relation_corpus`: questions of other
relations about the same subject ("What is the national dish of X?"), which look like the unedited
questions a user asks about an edited subject far more than the generic ones do. The relation corpus is
disjoint from the benchmarks' relations, so a benchmark still measures transfer to unseen relations.

The subject is found without a model: the longest run of capitalised words (an inner run, not the
question word that starts the sentence), with a trailing "'s" dropped. No subject -> no contrast prompts.
"""

from __future__ import annotations

import re
import zlib

from srmoa_dist.routing.relation_corpus import RELATIONS

CONTRAST_TEMPLATES: tuple[str, ...] = (
    "Tell me something interesting about {s}.",
    "What is {s} known for?",
    "Describe {s} in one sentence.",
    "What should a visitor know about {s}?",
)

_WORD = re.compile(r"[A-Za-z][\w'-]*")
_SKIP = {"I", "A", "An", "The", "What", "Which", "Who", "Whom", "Where", "When", "Why", "How", "Name",
         "Tell", "Is", "Are", "Was", "Were", "Do", "Does", "Did", "In", "If", "On", "For", "Of"}


def subject_of(question: str) -> str | None:
    """The subject name of a question: the longest run of capitalised words that is not a sentence's
    opening word or a common capitalised word; None when there is none."""
    best: list[str] = []
    run: list[str] = []
    for m in _WORD.finditer(question):
        w = m.group(0)
        sentence_start = m.start() == 0 or question[:m.start()].rstrip().endswith((".", "?", "!", "\n"))
        stem = w[:-2] if w.endswith("'s") else w
        if stem[:1].isupper() and not (sentence_start and stem in _SKIP) and stem not in _SKIP:
            run.append(stem)
            if w.endswith("'s"):               # "Bo Tam's": the name ends here
                best = run if len(run) > len(best) else best
                run = []
        else:
            if len(run) > len(best):
                best = run
            run = []
    if len(run) > len(best):
        best = run
    return " ".join(best) if best else None


def contrast_questions(question: str, n: int) -> list[str]:
    """Up to n generic questions about the question's subject (none without a subject)."""
    s = subject_of(question)
    if s is None or n <= 0:
        return []
    return [t.format(s=s) for t in CONTRAST_TEMPLATES[:n]]


def relation_questions(question: str, n: int) -> list[str]:
    """Up to n questions of other relations about the question's subject, drawn from the relation corpus
    (the first wording of each relation, a fixed choice per subject); none without a subject."""
    s = subject_of(question)
    if s is None or n <= 0:
        return []
    pool = [r[0] for kind in sorted(RELATIONS) for r in RELATIONS[kind]]
    start = zlib.crc32(s.lower().encode()) % len(pool)
    step = 7                                    # coprime with the pool size: n distinct relations
    while len(pool) % step == 0:
        step += 1
    picks = [pool[(start + j * step) % len(pool)] for j in range(min(n, len(pool)))]
    return [t.format(e=s) for t in picks]


def first_sentence(text: str, max_chars: int = 200) -> str:
    """The first sentence of a reply (a whole sentence makes a clean training target), else its start."""
    t = " ".join(text.split())
    m = re.search(r"[.!?](\s|$)", t)
    return (t[: m.end()].strip() if m else t)[:max_chars].strip()


__all__ = ["CONTRAST_TEMPLATES", "contrast_questions", "first_sentence", "relation_questions", "subject_of"]
