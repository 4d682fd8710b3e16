"""Chat templating with token masks: which tokens of the templated ids are the user's words.

The routing query pools hidden states over the tokens of the last user message's *content* only
(not the system prompt, not the role markers of the template): a shared system prompt otherwise
dominates the mean. The mask is found by rendering the template to text, locating the content's
character span, and keeping the tokens whose offsets overlap it (fast tokenizers), or by tokenizing
prefixes (slow tokenizers).

Shapes: B conversations, T tokens (left padded to the longest).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
Encoded = tuple[list[int], list[bool], list[bool]]  # one conversation's (ids, user_mask, answer_mask)


@dataclass(frozen=True)
class ChatBatch:
    """Templated, tokenized, left-padded conversations."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 0 on left padding
    user_mask: torch.Tensor  # (B, T) bool: content tokens of the last user message
    answer_mask: torch.Tensor  # (B, T) bool: content tokens of a final assistant message + its end token
    lengths: tuple[int, ...]  # unpadded length of each conversation

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, T) positions counted from each sequence's first real token (HF generate's convention)."""
        pos = self.attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(self.attention_mask == 0, 1)


def with_system(messages: Sequence[Message], system_prompt: str | None) -> list[dict[str, str]]:
    """Validated copy of `messages`, with `system_prompt` in front when they have no system message."""
    msgs = [dict(m) for m in messages]
    if not msgs:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(msgs):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must have role in {ROLES} and a string content, got {m!r}")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "user" for m in msgs):
        raise ValueError("a conversation needs a user message")
    return msgs


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_one(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool | None = None
) -> Encoded:
    """(ids, user_mask, answer_mask) of one conversation (`messages` already carry their system prompt).

    add_generation_prompt: None = True unless the conversation ends with an assistant message
    (a training example, whose answer tokens `answer_mask` marks).
    """
    msgs = list(messages)
    ends_with_answer = msgs[-1]["role"] == "assistant"
    if add_generation_prompt is None:
        add_generation_prompt = not ends_with_answer
    text = render(tokenizer, msgs, add_generation_prompt)
    u = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    spans = [_content_span(tokenizer, msgs, u, text)]
    a_span = _content_span(tokenizer, msgs, len(msgs) - 1, text) if ends_with_answer else None
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        user = [_overlaps(o, spans[0]) for o in offsets]
        answer = [a_span is not None and _overlaps(o, a_span) for o in offsets]
    else:
        ids = _ids(tokenizer, text)
        user = _prefix_mask(tokenizer, text, spans[0], len(ids))
        answer = _prefix_mask(tokenizer, text, a_span, len(ids)) if a_span else [False] * len(ids)
    if not any(user):
        raise ValueError(f"the user message {msgs[u]['content'][:60]!r} has no tokens in the templated ids")
    if a_span is not None:
        last = max((i for i, a in enumerate(answer) if a), default=None)
        eos = getattr(tokenizer, "eos_token_id", None)
        if last is not None and last + 1 < len(ids) and ids[last + 1] == eos:
            answer[last + 1] = True  # learn to stop: the end-of-turn token belongs to the answer
    return ids, user, answer


def encode_prompt(tokenizer: Any, prompt: str) -> Encoded:
    """(ids, user_mask, answer_mask) of a raw completion prompt: no chat template, no system prompt
    (as vLLM's /v1/completions). The tokenizer's own special tokens (a BOS) are added; every prompt
    token is the user's (the routing query pools over all of them); nothing is an answer."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"a prompt must be a non-empty string, got {prompt!r:.60}")
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise ValueError(f"the prompt {prompt[:60]!r} has no tokens")
    return ids, [True] * len(ids), [False] * len(ids)


def encode_chat(
    tokenizer: Any,
    batch_messages: Sequence[Sequence[Message]],
    system_prompt: str | None = None,
    *,
    add_generation_prompt: bool | None = None,
    device: torch.device | str | None = None,
) -> ChatBatch:
    """Template, tokenize and left-pad a batch of conversations (see `encode_one`, `pad`)."""
    if not batch_messages:
        raise ValueError("empty batch")
    rows = [
        encode_one(tokenizer, with_system(m, system_prompt), add_generation_prompt=add_generation_prompt)
        for m in batch_messages
    ]
    return pad(tokenizer, rows, device)


def pad(tokenizer: Any, rows: Sequence[Encoded], device: torch.device | str | None = None) -> ChatBatch:
    """Left-pad conversations already encoded by `encode_one` into one `ChatBatch`."""
    if not rows:
        raise ValueError("empty batch")
    T = max(len(r[0]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    B = len(rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    user = torch.zeros(B, T, dtype=torch.bool)
    ans = torch.zeros(B, T, dtype=torch.bool)
    for b, (i, u, a) in enumerate(rows):
        n = len(i)
        ids[b, T - n :] = torch.tensor(i, dtype=torch.long)
        att[b, T - n :] = 1
        user[b, T - n :] = torch.tensor(u, dtype=torch.bool)
        ans[b, T - n :] = torch.tensor(a, dtype=torch.bool)
    if device is not None:
        ids, att, user, ans = (t.to(device) for t in (ids, att, user, ans))
    return ChatBatch(ids, att, user, ans, tuple(len(r[0]) for r in rows))


def _content_span(tokenizer: Any, msgs: list[dict[str, str]], j: int, full: str) -> tuple[int, int]:
    """Character span [start, end) of message j's content within the rendered conversation `full`."""
    content = msgs[j]["content"]
    prefix = render(tokenizer, msgs[: j + 1], add_generation_prompt=False)
    for c in (content, content.strip()):
        if not c:
            continue
        pos = prefix.rfind(c)
        if pos >= 0 and full.startswith(prefix[: pos + len(c)]):
            return pos, pos + len(c)
    # templates that do not render prefixes as prefixes: the last occurrence in the whole text
    pos = full.rfind(content.strip())
    if pos < 0 or not content.strip():
        raise ValueError(f"cannot locate message {j}'s content {content[:60]!r} in the chat template's text")
    log.debug("content span of message %d found by search, not by prefix", j)
    return pos, pos + len(content.strip())


def _overlaps(offset: Sequence[int], span: tuple[int, int]) -> bool:
    s, e = offset
    return e > s and s < span[1] and e > span[0]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_mask(tokenizer: Any, text: str, span: tuple[int, int], n: int) -> list[bool]:
    """Tokens from len(tok(text[:start])) to len(tok(text[:end])) (slow tokenizers, no offsets)."""
    a, b = len(_ids(tokenizer, text[: span[0]])), len(_ids(tokenizer, text[: span[1]]))
    return [a <= i < b for i in range(n)]
