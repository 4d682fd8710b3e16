"""Diversification: a rule and its failing exchange -> exactly 4 training prompts of different structure.

Each prompt is a chat conversation (messages ending with the user's turn) and the target text of the
assistant's answer; the trainer puts the LM loss on the answer tokens only. The four structures:

- instruction:     the failing request itself, as the user asked it -> the rule, when it states the
                   correct answer (a full sentence, as the base model answers), else the answer;
- question/answer: "Question: ... Answer briefly." -> the correct answer;
- statement:       "What should one know to answer: ...?" -> the rule, stated;
- worked example:  "... Explain your reasoning." -> the rule, then "So the answer is ...".

The user's text of every structure carries the failing question, so the four routing queries lie near
the question (and its paraphrases), and the key trained from them routes there. The rule is only ever a
target, never put in the user's text: the expert has to hold it, not read it. Held-out evaluation text
passed as `exclude` must not appear in any prompt or target: a `HeldOutLeak` is raised if it would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from srmoa_dist.ttt.detect import Failure

STRUCTURES = ("instruction", "question_answer", "statement", "worked_example")
CONTRAST = "contrast"          # a row that keeps the base model's answer (`ttt.contrast`), not an edit's


class HeldOutLeak(ValueError):
    """A held-out evaluation text would appear in the training prompts."""


@dataclass(frozen=True)
class TrainingPrompt:
    """One (messages, target) pair; the LM loss covers the target's tokens only."""

    structure: str                          # one of STRUCTURES, or CONTRAST
    messages: tuple[dict[str, str], ...]    # ends with the user's turn
    target: str                             # the assistant's answer text

    def __post_init__(self) -> None:
        if self.structure not in (*STRUCTURES, CONTRAST):
            raise ValueError(f"structure must be one of {(*STRUCTURES, CONTRAST)}, got {self.structure!r}")
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("a training prompt's messages must end with a user turn")
        if not self.target.strip():
            raise ValueError("a training prompt's target must not be empty")

    @property
    def user_text(self) -> str:
        return self.messages[-1]["content"]

    def to_dict(self) -> dict:
        return {"structure": self.structure, "messages": [dict(m) for m in self.messages],
                "target": self.target}

    @classmethod
    def from_dict(cls, d: dict) -> TrainingPrompt:
        return cls(structure=d["structure"], messages=tuple(dict(m) for m in d["messages"]),
                   target=d["target"])


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _sentence(s: str) -> str:
    s = " ".join(s.split())
    return s if s[-1:] in ".!?" else s + "."


def check_held_out(prompts: Iterable[TrainingPrompt], exclude: Sequence[str]) -> None:
    """Raise HeldOutLeak if any held-out text (case/whitespace-insensitive) is inside a prompt or target."""
    held = [(_norm(x), x) for x in exclude if isinstance(x, str) and x.strip()]
    if len(held) != len([x for x in exclude]):
        raise ValueError(f"exclude must hold non-empty strings, got {list(exclude)!r}")
    for p in prompts:
        texts = [m["content"] for m in p.messages] + [p.target]
        for t in texts:
            nt = _norm(t)
            for h, raw in held:
                if h in nt:
                    raise HeldOutLeak(
                        f"held-out text {raw!r} would appear in the {p.structure} training prompt; "
                        "the edit must not train on evaluation text"
                    )


def diversify(
    failure: Failure,
    rule: str,
    *,
    exclude: Sequence[str] = (),
    system_prompt: str | None = None,
) -> list[TrainingPrompt]:
    """Exactly 4 training prompts (STRUCTURES order) for one failure and its rule."""
    if not isinstance(rule, str) or not rule.strip():
        raise ValueError(f"rule must be a non-empty string, got {rule!r}")
    question = " ".join(failure.question.split())
    rule_s = _sentence(rule)
    answer = " ".join(failure.correct_answer.split()) if failure.correct_answer else None
    q_plain = question.rstrip()
    # The correct answer, or (rule only) the rule itself as the answer.
    direct = answer if answer is not None else rule_s
    spoken = rule_s if answer is None or _norm(answer) in _norm(rule_s) else answer
    worked = f"{rule_s} So the answer is {answer}." if answer is not None else rule_s

    # Earlier turns of the failing exchange stay (the context the failure happened in), except any
    # system prompt, which is replaced by the serving one so training sees what serving will see.
    history = [dict(m) for m in failure.messages[:-1] if m["role"] != "system"]
    head = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + history

    def conv(user: str) -> tuple[dict[str, str], ...]:
        return tuple(head + [{"role": "user", "content": user}])

    prompts = [
        TrainingPrompt("instruction", conv(failure.question), spoken),
        TrainingPrompt("question_answer", conv(f"Question: {q_plain}\nAnswer briefly."), direct),
        TrainingPrompt("statement", conv(f"What should one know to answer this: {q_plain}"), rule_s),
        TrainingPrompt("worked_example", conv(f"{q_plain}\nExplain your reasoning."), worked),
    ]
    assert [p.structure for p in prompts] == list(STRUCTURES)
    check_held_out(prompts, exclude)
    return prompts
