"""What every edit of one store shares (`EditEnv`: the model, the stores, the ledger, the config), and the
routing, fetching and asking helpers that the edit and the Ray layer reuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.ttt.contrast import first_sentence
from srmoa_dist.ttt.detect import Messages
from srmoa_dist.ttt.ledger import EditLedger
from srmoa_dist.ttt.reflect import Ask


@dataclass(frozen=True)
class KeyRouter:
    """generation.Router over a key store: top-k ids, -1 under tau - slack (the key store's own tau when
    tau is None). With a slack, `tau` marks the candidates under it, which only the relation gate's
    named subjects keep (`routing.relation_gate.search_slack`)."""

    keystore: Any
    k: int
    tau: float | None = None
    slack: float = 0.0

    def __call__(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        floor = None if self.tau is None else self.tau - self.slack
        return self.keystore.search(np.asarray(xq, dtype=np.float32), self.k, tau=floor)


def make_router(keystore: Any, k: int, tau: float | None = None, slack: float = 0.0) -> KeyRouter:
    """A `KeyRouter` (top-k ids, -1 under tau - slack; tau None: the key store's own, no slack)."""
    return KeyRouter(keystore, k, tau, slack if tau is not None else 0.0)


def make_fetch(store: Any) -> Callable[[list[int]], dict[int, Any]]:
    """generation.Fetch over an expert store's get_many."""
    def fetch(ids: list[int]) -> dict[int, Any]:
        ids = [int(i) for i in ids]
        return dict(zip(ids, store.get_many(ids)))
    return fetch


def model_ask(base: Any, max_new_tokens: int = 64) -> Ask:
    """An `Ask` for reflection: the plain base model (no routing), greedy, one user turn."""
    from srmoa_dist.model.generation import GenerationParams, generate

    def ask(prompt: str) -> str:
        [g] = generate(base, None, None, [[{"role": "user", "content": prompt}]],
                       params=GenerationParams(max_new_tokens=max_new_tokens))
        return g.text
    return ask


@dataclass
class EditEnv:
    """What every edit of one store shares: the model, the stores, the ledger and the config."""

    base: Any
    fusion: Any
    encoder: Any
    store: Any
    keystore: Any
    ledger: EditLedger
    cfg: SrmoaConfig
    invalidate: Callable[[list[int]], None] | None = None
    new_slot: Callable[[], int] | None = None        # None: a zero key added to the key store, pinned
    base_answers: dict[str, str] = field(default_factory=dict)   # contrast prompt -> base model's answer

    @property
    def namespace(self) -> str:
        """The tenant namespace the edit writes into: a `routing.namespaces.NamespaceView`'s own one."""
        return str(getattr(self.keystore, "own", None) or "default")

    def sync_relations(self) -> None:
        """Bring the relation gate's mirror of other edits' relations up to date (when it has one), so
        routing here decides as serving's will."""
        from srmoa_dist.routing.relation_gate import sync_edited

        sync_edited(self.encoder, self.keystore, self.store)

    def router(self) -> KeyRouter:
        """The router serving uses: tau, and the relation gate's slack for named subjects."""
        from srmoa_dist.routing.relation_gate import search_slack

        ks = self.cfg.keystore
        return make_router(self.keystore, ks.k, ks.tau, search_slack(self.encoder))

    def generate(self, chats: Sequence[Messages]) -> list[Any]:
        """Routed greedy generations (verification length), as serving would answer them."""
        if not chats:
            return []
        self.sync_relations()
        return self._decode(chats)

    def _decode(self, chats: Sequence[Messages]) -> list[Any]:
        """`generate` without the sync (its caller synced)."""
        from srmoa_dist.model.generation import GenerationParams, generate

        if not chats:
            return []
        params = GenerationParams(max_new_tokens=self.cfg.ttt.verify_max_new_tokens,
                                  gate_temperature=self.cfg.keystore.temperature)
        return generate(self.base, self.fusion, self.encoder, [list(c) for c in chats],
                        self.router(), make_fetch(self.store), params)

    def reask(self, chats: Sequence[Messages], expected: Sequence[Any]) -> list[Any]:
        """What `generate` answers each chat; where the answer is expected (a `model.greedy_check.Expected`,
        not None) it is confirmed in one routed forward, and only the chats whose expectation fails are
        decoded (`ttt.confirm_greedy`; off: every chat is decoded)."""
        from srmoa_dist.model.generation import make_route_step
        from srmoa_dist.model.greedy_check import confirm_greedy

        out: list[Any] = [None] * len(chats)
        if not chats:
            return out
        self.sync_relations()                     # once for the confirmed and the decoded chats alike
        idx = [j for j, e in enumerate(expected) if e is not None]
        if idx and self.cfg.ttt.confirm_greedy:
            step = make_route_step(self.router(), make_fetch(self.store), self.cfg.keystore.temperature)
            got = confirm_greedy(self.base, self.fusion, self.encoder, [list(chats[j]) for j in idx],
                                 [expected[j] for j in idx], step)
            for j, g in zip(idx, got):
                out[j] = g
        todo = [j for j, g in enumerate(out) if g is None]
        for j, g in zip(todo, self._decode([chats[j] for j in todo])):
            out[j] = g
        return out

    def expected_answer(self, chat: Messages, target: str | None) -> Any:
        """The verification output that answers `chat` with exactly `target` (None: no expectation)."""
        from srmoa_dist.model.greedy_check import expected_answer

        if not target:
            return None
        return expected_answer(self.base, list(chat), target, self.cfg.ttt.verify_max_new_tokens)

    def queries(self, chats: Sequence[Messages]) -> np.ndarray:
        from srmoa_dist.model.generation import queries

        return queries(self.base, self.encoder, [list(c) for c in chats])

    def base_answers_of(self, questions: Sequence[str]) -> dict[str, str]:
        """The base model's own first sentence (no expert) answering each question, kept across edits
        (it never changes); the ones not yet known are generated in one batch."""
        from srmoa_dist.model.generation import GenerationParams, generate

        todo = list(dict.fromkeys(q for q in questions if q not in self.base_answers))
        if todo:
            params = GenerationParams(max_new_tokens=self.cfg.ttt.verify_max_new_tokens)
            gens = generate(self.base, None, None, [[{"role": "user", "content": q}] for q in todo],
                            params=params)
            self.base_answers.update((q, first_sentence(g.text)) for q, g in zip(todo, gens))
        return {q: self.base_answers[q] for q in questions}
