"""Pydantic request/response models of the HTTP API (OpenAI-compatible, plus routing and feedback).

Requests accept the OpenAI fields this server implements and ignore unknown ones (clients send many
optional fields); fields of the wrong type or out of range are rejected with a 400 naming the field.
Extensions beyond OpenAI:

- request ``use_experts`` (default true): false answers with the frozen base model alone (the
  benchmark's baseline);
- request ``k`` / ``tau``: this request's number of experts and deferral threshold;
- request ``model`` ``"<base model id>:<adapter name>"``: that named expert, forced (gate 1, no search);
- response ``routing``: the experts the request reached, their scores and gates.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant"]


class FieldError(ValueError):
    """A check over several fields (a model validator) that names the parameter at fault: the 400's
    `error.param` (a plain ValueError there would name none)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(_Req):
    role: Role
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v: str | list[TextPart]) -> str:
        return v if isinstance(v, str) else "".join(p.text for p in v)

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": str(self.content)}


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)   # None or 0: greedy
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    use_experts: bool = True
    k: int | None = Field(default=None, ge=1)                    # at most this many experts (<= keystore.k)
    tau: float | None = Field(default=None, ge=-1.0, le=1.0)     # this request's deferral threshold
    #  (an edit whose subject the prompt names may score up to model.relation_named_slack under it)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if not any(m.role == "user" and str(m.content).strip() for m in self.messages):
            raise FieldError("messages", "messages must hold at least one non-empty user message")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if len(prompts) > 16:
            raise ValueError("at most 16 prompts per request")
        if any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


# ----------------------------------------------------------------------------------------------------
# Responses


class Routing(BaseModel):
    """Where one request went: the experts kept after deferral, their scores and gates."""

    expert_ids: list[int] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)
    gates: list[float] = Field(default_factory=list)
    deferred: bool = True          # no expert kept (tau, the relation gate): the base model answered alone
    use_experts: bool = True
    skipped: list[int] = Field(default_factory=list)   # routed experts no longer in the store, left out
    degraded: bool = False         # routing fell short (key store slow or down, experts missing)
    degraded_reason: str | None = None
    forced: bool = False           # the request named its expert (model "<base>:<adapter>"): gate 1


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    routing: Routing


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    routing: Routing | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    routing: Routing | list[Routing]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "srmoa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------------------------------
# Feedback, edits, experts, stats


class FeedbackRequest(_Req):
    """A failed exchange: the prompt (messages or a bare prompt), what the model said, and what is
    right (a correct answer and/or a rule). `verdict` "correct" records nothing and trains nothing."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: str | None = Field(default=None, min_length=1)
    response: str = ""
    verdict: Literal["wrong", "correct"] = "wrong"
    correct_answer: str | None = Field(default=None, min_length=1)
    rule: str | None = Field(default=None, min_length=1)
    expert_ids: list[int] = Field(default_factory=list)
    request_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> FeedbackRequest:
        if (self.messages is None) == (self.prompt is None):
            raise FieldError("messages" if self.prompt is None else "prompt",
                             "give exactly one of 'messages' or 'prompt'")
        if self.messages is not None and self.messages[-1].role != "user":
            raise FieldError("messages", "messages must end with the user's turn that failed")
        if self.verdict == "wrong" and not (self.correct_answer or self.rule):
            raise FieldError("correct_answer", "a 'wrong' verdict needs a correct_answer, a rule, or both")
        return self

    def message_dicts(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.as_dict() for m in self.messages]
        return [{"role": "user", "content": str(self.prompt)}]


JobStatus = Literal["pending", "running", "done", "failed", "skipped"]


class OpenModel(BaseModel):
    """A response model whose documented fields are validated; fields added later pass through."""

    model_config = ConfigDict(extra="allow")


class JobResult(OpenModel):
    """A feedback job's result: its edit's outcome (ttt/edit.py EditResult, or the ledger's record
    after a recovery), or why nothing was trained (`reason`, a skipped job)."""

    edit_id: str | None = None
    status: str | None = None                 # verified | rolled_back | committed | failed
    expert_id: int | None = None
    created: bool | None = None
    rule: str | None = None
    steps: int | None = None
    new_version: int | None = None
    answer: str | None = None
    answer_ok: bool | None = None
    reason: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)   # reflect_s, train_s, ... total_s
    recovered: bool | None = None


class FeedbackJob(BaseModel):
    job_id: str
    object: Literal["feedback.job"] = "feedback.job"
    status: JobStatus
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    result: JobResult | None = None
    attempt: int = 1
    namespace: str = "default"


class KeyInfo(OpenModel):
    """An expert's routing key as the key store holds it."""

    norm: float
    usage: float
    pinned: bool
    key_version: int
    namespace: str | None = None


class CatalogExpert(OpenModel):
    """An expert's catalog entry (experts/catalog.py): its namespace, origin, name and examples."""

    id: int
    object: Literal["expert"] = "expert"
    namespace: str
    origin: str                               # edit | import
    name: str | None = None
    created: float = 0.0
    examples: list[str] = Field(default_factory=list)
    edit_id: str | None = None


class ExpertInfo(BaseModel):
    id: int
    object: Literal["expert"] = "expert"
    shard: int
    version: int
    rank: int
    alpha: float
    dtype: str
    nbytes: int
    targets: dict[str, list[int]]
    key: KeyInfo | None = None
    catalog: CatalogExpert | None = None


class PromptMessage(BaseModel):
    role: Role
    content: str


class EditPrompt(OpenModel):
    """One of an edit's training prompts (ttt/diversify.py TrainingPrompt)."""

    structure: str
    messages: list[PromptMessage]
    target: str | None = None


class EditInfo(OpenModel):
    """One edit as the ledger records it (ttt/ledger.py EditRecord, keys left out)."""

    edit_id: str
    object: Literal["edit"] = "edit"
    status: str                               # ttt/ledger.py STATUSES
    rule: str = ""
    prompts: list[EditPrompt] = Field(default_factory=list)
    expert_id: int
    created: bool
    prev_version: int | None = None
    new_version: int | None = None
    prev_pinned: bool = False
    lm_losses: list[float] = Field(default_factory=list)
    router_losses: list[float] = Field(default_factory=list)
    steps: int = 0
    question: str = ""
    correct_answer: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    train_seconds: float = 0.0
    notes: list[str] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)   # free-form: job id, source, verification details


class EditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EditInfo]


__all__ = [
    "FieldError", "ChatMessage", "ChatCompletionRequest", "CompletionRequest", "Routing", "Usage",
    "ChatCompletion", "ChatCompletionChunk", "ChatChunkChoice", "ChunkDelta", "ChatChoice",
    "AssistantMessage",
    "Completion", "CompletionChoice", "ModelCard", "ModelList", "FeedbackRequest", "FeedbackJob",
    "ExpertInfo", "EditList", "JobStatus", "JobResult", "KeyInfo", "CatalogExpert", "EditInfo", "EditPrompt",
    "PromptMessage", "OpenModel",
]
