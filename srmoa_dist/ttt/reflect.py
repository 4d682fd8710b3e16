"""Reflection: turn a failure into one short correction rule.

When the feedback carries a rule it is validated and used (SR-MoA's form `RULE: ...` is accepted: the
marker is dropped). Otherwise, by `TTTConfig.reflect`:

- ``auto`` (default): with a correct answer, the rule is built from the exchange (`clean_rule`), no
  model call: reflection cost ~10 s an edit through the API and the 135M model's rules were often
  malformed or restated the wrong answer; without one, the model is asked;
- ``always``: the base model is asked (through `ask`, any text -> text callable, so tests need no
  model) to state the rule on a line that starts with `RULE:`; the first such line is parsed and must
  be a well-formed sentence (`is_sentence`) that states the correct answer when one was given; a
  rejected rule falls back to `clean_rule` when there is a correct answer;
- ``never``: the model is never asked.

`clean_rule` turns the question and the answer into one declarative sentence in the model's own voice
("What is the capital of X?" + "Y" -> "The capital of X is Y."), never a template that quotes the
question: training targets are learned as answer style. Rejected rules raise `RuleRejected`.
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
    m = _RULE_LINE.match(text)
    if m:                                  # SR-MoA's own form, "RULE: <the rule>": keep what follows
        body = m.group(1).strip().strip("*_\"'`").strip()
        if not body:
            raise RuleRejected("the rule text is a 'RULE:' header with nothing after it", text)
        return validate_rule(body, max_chars)
    if not text:
        raise RuleRejected("the rule is empty", rule)
    if len(text) > max_chars:
        raise RuleRejected(f"the rule is {len(text)} characters long, more than max_rule_chars={max_chars}",
                           text)
    if len(text) < _MIN_RULE_CHARS or not re.search(r"[A-Za-z]{2,}", text):
        raise RuleRejected(f"the rule is too short to state anything (under {_MIN_RULE_CHARS} characters "
                           "or no word)", text)
    return text


def is_sentence(text: str) -> bool:
    """A well-formed sentence: starts with a letter, digit or quote, has at least 3 words, ends with
    . ! or ?, and its quotes and brackets pair up (malformed model output such as 'Suost" to provide a
    correct answer.' fails)."""
    t = text.strip()
    if not t or not re.match(r"^[\"'A-Za-z0-9]", t) or not t.endswith((".", "!", "?")):
        return False
    if len(re.findall(r"[A-Za-z0-9]+", t)) < 3:
        return False
    if t.count('"') % 2 or t.count("(") != t.count(")") or t.count("[") != t.count("]"):
        return False
    return not re.match(r"^[a-z]+[A-Z\"]", t)     # a torn word at the start ("Suost\"...")


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


_BE = r"(is|are|was|were)"
_PREP = r"(to|by|with|from|for|about|on|at|in|of)"
# nouns that name what is asked of a thing, not the kind of the answer ("What color is the flag of X"
# asks the flag's colour; "Which city is the capital of X" asks a city)
_ATTRIBUTES = r"(?:colou?r|size|shape|height|length|age|weight)"
# past participles: the verb of a statement that a question puts last ("Where was X born" -> "X was born
# in Y"; any other last word ends the subject: "Where is the main factory of X" -> "... of X is in Y"),
# or before a final preposition ("Who is X married to"; any other word there is a clause's verb: "What is
# the name of the company X works for")
_PARTICIPLES = r"[a-z]+ed|born|built|made|held|kept|sold|grown|known|written|set|run"
# (matched case-sensitively: a capitalised last word is a name, "Where is Bob Reed")
_VERB_LAST = re.compile(rf"^(?:{_PARTICIPLES})$")
# (pattern over the question without its "?", builder of the sentence from the groups and the answer)
_DECLARATIVES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], str], str]], ...] = (
    # "What color is the flag of X" -> "The flag of X is Y"
    (re.compile(rf"^(?:what|which)\s+{_ATTRIBUTES}\s+{_BE}\s+(.+)$", re.I),
     lambda m, a: f"{_cap(m[2])} {m[1]} {a}"),
    # "Who is X married to" -> "X is married to Y"; "Which product is X famous for" -> "X is famous for Y"
    (re.compile(rf"^(?:what|who|whom|which)(?:\s+\w+)?\s+{_BE}\s+(.+)\s+({_PARTICIPLES}|famous)"
                rf"\s+{_PREP}$", re.I),
     lambda m, a: f"{_cap(m[2])} {m[1]} {m[3]} {m[4]} {a}"),
    # "What is X's dog called" -> "X's dog is called Y"
    (re.compile(rf"^(?:what|who)\s+{_BE}\s+(.+)\s+(called|named)$", re.I),
     lambda m, a: f"{_cap(m[2])} {m[1]} {m[3]} {a}"),
    # "Which city is the capital of X" -> "Y is the capital of X"
    (re.compile(rf"^(?:what|which)\s+\w+\s+{_BE}\s+(.+)$", re.I), lambda m, a: f"{a} {m[1]} {m[2]}"),
    # "What is the capital of X" -> "The capital of X is Y"
    (re.compile(rf"^(?:what|who|which)\s+{_BE}\s+(.+)$", re.I), lambda m, a: f"{_cap(m[2])} {m[1]} {a}"),
    # "Where was X born" -> "X was born in Y"; "Where is the main factory of X" -> "... of X is in Y"
    (re.compile(rf"^(?:where|in\s+(?:what|which)\s+\w+)\s+{_BE}\s+(.+)$", re.I),
     lambda m, a: _where(m[1], m[2], a)),
    # "Who founded X" -> "Y founded X"; "Who leads X as president" -> "Y leads X as president"
    (re.compile(r"^who\s+(?!does\b)(\w+ed|\w+s)\s+(.+)$", re.I), lambda m, a: f"{a} {m[1]} {m[2]}"),
    # "Name the capital city of X" -> "The capital city of X is Y"
    (re.compile(r"^name\s+(.+)$", re.I), lambda m, a: f"{_cap(m[1])} is {a}"),
)


def _where(be: str, rest: str, a: str) -> str:
    head, _, last = rest.rpartition(" ")
    if head and _VERB_LAST.match(last):
        return f"{_cap(head)} {be} {last} in {a}"
    return f"{_cap(rest)} {be} in {a}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def clean_rule(question: str, answer: str) -> str:
    """One declarative sentence stating `answer` to `question`, in plain words (see the module
    docstring); "The answer is <answer>." when the question has no form it knows."""
    q = " ".join(question.split()).rstrip(" ?.!")
    a = " ".join(answer.split()).rstrip(".")
    if "\n" not in question and len(q) <= 200:
        for pattern, build in _DECLARATIVES:
            m = pattern.match(q)
            if m:
                return _sentence_end(build(m, a))
    return _sentence_end(f"The answer is {a}")


def _sentence_end(s: str) -> str:
    return s if s.endswith((".", "!", "?")) else s + "."


def fallback_rule(failure: Failure, max_chars: int) -> str:
    """The clean rule of the exchange (needs a correct answer)."""
    if failure.correct_answer is None:
        raise RuleRejected("no rule given and no correct answer to write one from")
    rule = clean_rule(failure.question, failure.correct_answer)
    if len(rule) > max_chars:
        rule = _sentence_end(f"The answer is {' '.join(failure.correct_answer.split())}")
    return validate_rule(rule, max_chars)


def reflect(failure: Failure, ask: Ask | None, cfg: TTTConfig, *, fallback: bool = True) -> str:
    """The rule of a failure: the given one (validated), else by `cfg.reflect` (see the module
    docstring) the clean rule of the exchange or the base model's (via `ask`, validated), falling back
    to the clean rule when `fallback` and a correct answer allow. Raises RuleRejected otherwise."""
    if failure.rule is not None:
        return validate_rule(failure.rule, cfg.max_rule_chars)
    use_model = ask is not None and (cfg.reflect == "always" or
                                     (cfg.reflect == "auto" and failure.correct_answer is None))
    if not use_model:
        if fallback and failure.correct_answer is not None:
            return fallback_rule(failure, cfg.max_rule_chars)
        raise RuleRejected("no rule given and no model to ask for one" if ask is None else
                           "no rule given, no correct answer, and ttt.reflect is 'never'")
    reply = ask(reflection_prompt(failure))
    try:
        rule = parse_rule(reply, cfg.max_rule_chars)
        if not is_sentence(rule):
            raise RuleRejected("the rule is not a well-formed sentence", rule)
        if failure.correct_answer is not None and not mentions_answer(rule, failure.correct_answer):
            # a small model often restates its wrong answer as the "rule": never train on that
            raise RuleRejected(f"the rule does not state the correct answer {failure.correct_answer!r}", rule)
        return rule
    except RuleRejected as e:
        if fallback and failure.correct_answer is not None:
            log.info("model's rule rejected (%s); falling back to a rule from the exchange", e.reason)
            return fallback_rule(failure, cfg.max_rule_chars)
        raise
