"""Reflection: turn a failure into one short correction rule.

When the feedback carries a rule it is validated and used as is. Otherwise the base model is asked
(through `ask`, any text -> text callable, so tests need no model) to state the rule on a line that
starts with `RULE:`; the first such line is parsed and validated (and, when the failure carries a
correct answer, the rule must state it). Rejected rules raise `RuleRejected` with the reason. When the
model's rule is rejected but the failure carries a correct answer, `reflect(..., fallback=True)` falls
back to a rule written from the exchange itself ("The answer to '<question>' is: <answer>"), so a weak
base model never blocks an edit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from srmoa_dist.config import TTTConfig
from srmoa_dist.ttt.detect import Failure, find_numbers, parse_number

log = logging.getLogger(__name__)

Ask = Callable[[str], str]

REFLECT_TEMPLATE = (
    "An assistant answered a question wrongly.\n"
    "Question: {question}\n"
    "Wrong answer: {response}\n"
    "{correct}"
    "State, in one sentence, the general rule or fact the assistant should have used. "
    "Write it on one line that starts with 'RULE:'.\n"
)

_RULE_LINE = re.compile(r"^\s*[*_#>\-\s]*rule\s*[*_]*\s*[:：]\s*(.*)$", re.IGNORECASE)
_MIN_RULE_CHARS = 8


class RuleRejected(ValueError):
    """A candidate rule failed validation; `.reason` says why, `.text` is what was rejected."""

    def __init__(self, reason: str, text: str = "") -> None:
        self.reason = reason
        self.text = text
        shown = text if len(text) <= 120 else text[:117] + "..."
        super().__init__(f"rule rejected: {reason}" + (f" (got {shown!r})" if text else ""))


def reflection_prompt(failure: Failure) -> str:
    """The text sent to the base model to make it state a rule."""
    correct = f"Correct answer: {failure.correct_answer}\n" if failure.correct_answer else ""
    return REFLECT_TEMPLATE.format(question=failure.question.strip(), response=failure.response.strip(),
                                   correct=correct)


def validate_rule(rule: str, max_chars: int) -> str:
    """Strip and check a rule: not empty, not trivially short, at most max_chars, one paragraph."""
    if not isinstance(rule, str):
        raise RuleRejected(f"a rule must be a string, got {type(rule).__name__}")
    text = " ".join(rule.split())          # one line, single spaces
    text = text.strip().strip("\"'`").strip()
    if not text:
        raise RuleRejected("the rule is empty", rule)
    if len(text) > max_chars:
        raise RuleRejected(f"the rule is {len(text)} characters long, more than max_rule_chars={max_chars}",
                           text)
    if len(text) < _MIN_RULE_CHARS or not re.search(r"[A-Za-z]{2,}", text):
        raise RuleRejected(f"the rule is too short to state anything (under {_MIN_RULE_CHARS} characters "
                           "or no word)", text)
    if _RULE_LINE.match(text):
        raise RuleRejected("the rule text is itself a 'RULE:' header with nothing after it", text)
    return text


_RULE_MARK = re.compile(r"RULE\s*[*_]*\s*[:：]")           # the marker, anywhere in a line (uppercase)


def _after_marker(line: str) -> str | None:
    """The text after the last 'RULE:' of a line (models nest it: 'the rule of "RULE: x"'), or after
    a line-initial 'rule:' in any case; None when the line has neither."""
    marks = list(_RULE_MARK.finditer(line))
    if marks:
        return line[marks[-1].end():]
    m = _RULE_LINE.match(line)
    return m.group(1) if m else None


def parse_rule(text: str, max_chars: int) -> str:
    """The rule stated in a model's reply: the text after the first line's last 'RULE:' (a sentence
    wrapped over several lines is joined up to its end or a blank line), stripped of quotes and
    markdown, validated. RuleRejected when there is none or it is invalid."""
    if not isinstance(text, str):
        raise RuleRejected(f"the model's reply must be a string, got {type(text).__name__}")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        first = _after_marker(line)
        if first is None:
            continue
        parts = [first]
        for nxt in lines[i + 1:]:     # a sentence wrapped over lines continues until it ends
            done = " ".join(parts).rstrip(" *_\"'").endswith((".", "!", "?"))
            if done or not nxt.strip() or _after_marker(nxt) is not None:
                break
            parts.append(nxt)
        body = " ".join(p.strip() for p in parts).strip().strip("*_\"'`").strip()
        return validate_rule(body, max_chars)
    raise RuleRejected("the reply has no 'RULE:' line", text)


def mentions_answer(rule: str, answer: str) -> bool:
    """Does the rule state the answer? Numbers by value (any number of the rule), text by
    case- and whitespace-insensitive containment."""
    try:
        gold = parse_number(answer)
    except ValueError:
        norm = lambda x: " ".join(x.lower().split())
        return norm(answer) in norm(rule)
    return gold in find_numbers(rule)


def fallback_rule(failure: Failure, max_chars: int) -> str:
    """A rule written from the exchange itself (needs a correct answer)."""
    if failure.correct_answer is None:
        raise RuleRejected("no rule given and no correct answer to write one from")
    q = " ".join(failure.question.split())
    a = " ".join(failure.correct_answer.split())
    rule = f"The answer to '{q}' is: {a}"
    if len(rule) > max_chars:
        rule = f"The correct answer is: {a}"
    return validate_rule(rule, max_chars)


def reflect(failure: Failure, ask: Ask | None, cfg: TTTConfig, *, fallback: bool = True) -> str:
    """The rule of a failure: the given one (validated), else the base model's (via `ask`), else, with
    `fallback` and a correct answer, one written from the exchange. Raises RuleRejected otherwise."""
    if failure.rule is not None:
        return validate_rule(failure.rule, cfg.max_rule_chars)
    if ask is None:
        if fallback and failure.correct_answer is not None:
            return fallback_rule(failure, cfg.max_rule_chars)
        raise RuleRejected("no rule given and no model to ask for one")
    reply = ask(reflection_prompt(failure))
    try:
        rule = parse_rule(reply, cfg.max_rule_chars)
        if failure.correct_answer is not None and not mentions_answer(rule, failure.correct_answer):
            # a small model often restates its wrong answer as the "rule": never train on that
            raise RuleRejected(f"the rule does not state the correct answer {failure.correct_answer!r}", rule)
        return rule
    except RuleRejected as e:
        if fallback and failure.correct_answer is not None:
            log.info("model's rule rejected (%s); falling back to a rule from the exchange", e.reason)
            return fallback_rule(failure, cfg.max_rule_chars)
        raise
