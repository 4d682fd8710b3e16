"""Failure detection: explicit verdicts, a numeric-answer checker, and a registry of verifiers.

A `Failure` is what the rest of SR-TTT consumes: the failing exchange (chat messages that end with the
user's turn, and the model's response) plus what is known about the right behaviour: a correct answer,
a rule, or both. It comes either from explicit feedback (`explicit_failure`, the `/v1/feedback` path)
or from a verifier run on a reference (`detect`).

Verifiers are callables `(messages, response, reference) -> Verdict`; `register_verifier` adds one
under a name, `get_verifier(name)` returns it. The built-in "numeric" verifier checks arithmetic word
problems against a GSM8K-style reference ("... #### 42").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, str]]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response: right or wrong, and what the right behaviour is when known."""

    correct: bool
    answer: str | None = None         # the correct answer (text), when known
    rule: str | None = None           # a correction rule, when known
    source: str = "explicit"          # "explicit" (user feedback) or a verifier's name
    detail: str = ""                  # free text: why the verifier decided so

    def __post_init__(self) -> None:
        if not isinstance(self.correct, bool):
            raise ValueError(f"Verdict.correct must be a bool, got {self.correct!r}")
        for name in ("answer", "rule"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"Verdict.{name} must be a non-empty string or None, got {v!r}")
        if not self.source:
            raise ValueError("Verdict.source must not be empty")


@dataclass(frozen=True)
class Failure:
    """One failing exchange and what should have happened. At least one of correct_answer / rule."""

    messages: tuple[dict[str, str], ...]   # the prompt, ending with the user's turn
    response: str                          # what the model answered
    correct_answer: str | None = None
    rule: str | None = None
    source: str = "explicit"
    request_id: str | None = None
    expert_ids: tuple[int, ...] = field(default_factory=tuple)   # experts the failing request was routed to

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", _check_messages(self.messages))
        object.__setattr__(self, "expert_ids", tuple(int(i) for i in self.expert_ids))
        if not isinstance(self.response, str):
            raise ValueError(f"Failure.response must be a string, got {type(self.response).__name__}")
        for name in ("correct_answer", "rule"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"Failure.{name} must be a non-empty string or None, got {v!r}")
        if self.correct_answer is None and self.rule is None:
            raise ValueError("a Failure needs a correct_answer, a rule, or both (nothing to learn otherwise)")

    @property
    def question(self) -> str:
        """The last user message: the text that failed."""
        return self.messages[-1]["content"]


def _check_messages(messages: Messages) -> tuple[dict[str, str], ...]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, "
                         f"got {messages!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": str(m["role"]), "content": m["content"]})
    if out[-1]["role"] != "user":
        raise ValueError(f"the failing prompt must end with a user message, got role {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise ValueError("the failing prompt's last user message is empty")
    return tuple(out)


def as_messages(prompt: str | Messages) -> tuple[dict[str, str], ...]:
    """A bare string becomes a one-turn user conversation; a message list is checked and copied."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return _check_messages(prompt)


def explicit_failure(
    prompt: str | Messages,
    response: str,
    *,
    correct_answer: str | None = None,
    rule: str | None = None,
    request_id: str | None = None,
    expert_ids: Sequence[int] = (),
) -> Failure:
    """A Failure from explicit feedback (the user said the response was wrong)."""
    return Failure(
        messages=as_messages(prompt), response=response, correct_answer=correct_answer, rule=rule,
        source="explicit", request_id=request_id, expert_ids=tuple(expert_ids),
    )


# ----------------------------------------------------------------------------------------------------
# Numeric answers

# An optional sign, digits with optional thousands commas, an optional decimal part; or a bare ".5".
_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w)"
    r"|(?<![\w.])[-+]?\.\d+(?!\w)"
)
_GSM8K_MARK = "####"


def parse_number(text: str) -> Decimal:
    """One number written as text ('1,234', '$5', '-3.50', '7.') -> Decimal; ValueError if it is none."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string holding a number, got {type(text).__name__}")
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        raise ValueError(f"no number in {text!r}")
    try:
        d = Decimal(s)
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    return d


def find_numbers(text: str) -> list[Decimal]:
    """Every number written in a text, in order (commas, '$', signs and decimals handled)."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    out = []
    for tok in _NUMBER.findall(text):
        try:
            out.append(parse_number(tok))
        except ValueError:   # pragma: no cover - the pattern only matches numbers
            continue
    return out


def extract_last_number(text: str) -> Decimal | None:
    """The last number in a free-text answer (commas, '$', signs and decimals handled); None if none."""
    if not isinstance(text, str):
        raise ValueError(f"expected the model's answer as a string, got {type(text).__name__}")
    found = find_numbers(text)
    return found[-1] if found else None


def parse_reference(reference: str) -> Decimal:
    """The gold number of a GSM8K-style reference ('... #### 1,234') or of a bare number ('42')."""
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"reference must be a non-empty string, got {reference!r}")
    tail = reference.rsplit(_GSM8K_MARK, 1)[-1] if _GSM8K_MARK in reference else reference
    try:
        return parse_number(tail)
    except ValueError:
        raise ValueError(
            f"reference {reference!r} holds no number after '####' (GSM8K style) nor is a bare number"
        ) from None


def _fmt(d: Decimal) -> str:
    """Decimal -> plain text without exponent or trailing zeros ('42', '3.5')."""
    s = format(d.normalize(), "f")
    return s.rstrip("0").rstrip(".") if "." in s else s


# ----------------------------------------------------------------------------------------------------
# Verifiers


@runtime_checkable
class Verifier(Protocol):
    """Judges a response against a reference. `name` appears as Verdict.source."""

    name: str

    def __call__(self, messages: Messages, response: str, reference: str) -> Verdict: ...


@dataclass(frozen=True)
class NumericAnswerChecker:
    """Arithmetic word problems: the last number of the response must equal the reference's number."""

    rel_tol: float = 1e-9
    name: str = "numeric"

    def __post_init__(self) -> None:
        if not self.rel_tol >= 0:
            raise ValueError(f"rel_tol must be >= 0, got {self.rel_tol!r}")

    def __call__(self, messages: Messages, response: str, reference: str) -> Verdict:
        gold = parse_reference(reference)
        got = extract_last_number(response)
        if got is None:
            return Verdict(False, answer=_fmt(gold), source=self.name, detail="no number in the response")
        ok = abs(got - gold) <= Decimal(str(self.rel_tol)) * max(abs(gold), Decimal(1))
        detail = f"got {_fmt(got)}, expected {_fmt(gold)}"
        return Verdict(ok, answer=_fmt(gold), source=self.name, detail=detail)


def answer_matches(response: str, answer: str) -> bool:
    """Does a free-text response contain the answer? Numbers compare by value (last number of the
    response), other answers by case- and whitespace-insensitive containment."""
    try:
        gold = parse_number(answer)
    except ValueError:
        norm = lambda s: " ".join(s.lower().split())
        return norm(answer) in norm(response)
    got = extract_last_number(response)
    return got is not None and got == gold


_VERIFIERS: dict[str, Callable[[], Verifier]] = {"numeric": NumericAnswerChecker}


def register_verifier(name: str, factory: Callable[[], Verifier], *, replace: bool = False) -> None:
    """Make a verifier available by name (factory called with no arguments)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"verifier name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"verifier factory for {name!r} must be callable, got {factory!r}")
    if name in _VERIFIERS and not replace:
        raise ValueError(f"verifier {name!r} is already registered (pass replace=True to override)")
    _VERIFIERS[name] = factory


def get_verifier(name: str) -> Verifier:
    try:
        return _VERIFIERS[name]()
    except KeyError:
        raise ValueError(f"unknown verifier {name!r}; registered: {sorted(_VERIFIERS)}") from None


def verifier_names() -> list[str]:
    return sorted(_VERIFIERS)


def detect(
    prompt: str | Messages,
    response: str,
    reference: str,
    verifier: str | Verifier = "numeric",
    *,
    rule: str | None = None,
    request_id: str | None = None,
    expert_ids: Sequence[int] = (),
) -> Failure | None:
    """Run a verifier; a Failure when the response is judged wrong, None when it is right."""
    v = get_verifier(verifier) if isinstance(verifier, str) else verifier
    messages = as_messages(prompt)
    verdict = v(messages, response, reference)
    if not isinstance(verdict, Verdict):
        name = getattr(v, "name", v)
        raise ValueError(f"verifier {name!r} returned {type(verdict).__name__}, not a Verdict")
    if verdict.correct:
        return None
    answer, why = verdict.answer, verdict.rule or rule
    if answer is None and why is None:
        log.warning("verifier %s found a failure but gave no answer or rule: nothing to learn",
                    verdict.source)
        return None
    return Failure(
        messages=messages, response=response, correct_answer=answer, rule=why, source=verdict.source,
        request_id=request_id, expert_ids=tuple(expert_ids),
    )


def failure_from_verdict(
    prompt: str | Messages,
    response: str,
    verdict: Verdict,
    *,
    request_id: str | None = None,
    expert_ids: Sequence[int] = (),
) -> Failure | None:
    """Explicit feedback as a Verdict -> a Failure (None when the verdict says the response was right)."""
    if verdict.correct:
        return None
    return Failure(
        messages=as_messages(prompt), response=response, correct_answer=verdict.answer, rule=verdict.rule,
        source=verdict.source, request_id=request_id, expert_ids=tuple(expert_ids),
    )
