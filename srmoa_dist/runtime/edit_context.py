"""What the trainer actor needs to run SR-TTT edits against the running store.

`EditContext` wires `ttt.edit.apply_edit` / `ttt.edit.rollback` to the Ray layer: the expert store is
an `ExpertStoreClient` over the shard actors (its writes publish cache invalidations, so serving
replicas drop old copies before the edited key is routed to), the key store a `KeyStoreProxy` over the
key-store actor, the ledger a local `EditLedger` under data_dir/ledger. The base model, query encoder
and fusion are loaded on first use (`load_model`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

# Unrelated prompts whose greedy answers an edit must leave unchanged (ttt.locality_probes of them).
LOCALITY_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Name a fruit that is yellow.",
    "What is 2 plus 2?",
    "Who wrote Hamlet?",
    "What do bees make?",
    "What is the opposite of hot?",
)


class EditContext:
    """Store clients, ledger and (lazily) the model of the trainer actor."""

    def __init__(self, cfg: SrmoaConfig, shards: list[Any], keystore: Any) -> None:
        from srmoa_dist.runtime.client import ExpertStoreClient
        from srmoa_dist.runtime.keystore_proxy import KeyStoreProxy
        from srmoa_dist.ttt.ledger import EditLedger

        self.cfg = cfg
        self.ledger = EditLedger(cfg.ledger_dir)
        self.keystore_handle = keystore
        self.client = ExpertStoreClient(shards, keystore=keystore, cache_size=256,
                                        timeout_s=cfg.runtime.call_timeout_s)
        self.keystore = KeyStoreProxy(keystore, cfg.keystore, timeout_s=cfg.runtime.call_timeout_s * 2)
        self.edit_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self.base: Any = None
        self.encoder: Any = None
        self.fusion: Any = None
        self._editor: Any = None

    def load_model(self) -> None:
        if self.base is not None:
            return
        with self._load_lock:
            if self.base is not None:
                return
            from srmoa_dist.model.fusion import ExpertFusion
            from srmoa_dist.model.loading import load_base_model
            from srmoa_dist.runtime.store_init import ensure_encoder

            t0 = time.perf_counter()
            base = load_base_model(self.cfg.model, self.cfg.model_cache_dir)
            self.encoder = ensure_encoder(self.cfg, base, self.keystore_handle)
            self.fusion = ExpertFusion(base.model, self.cfg.expert, self.cfg.model.query_layer)
            self.base = base
            log.info("trainer model loaded in %.1f s", time.perf_counter() - t0)

    def invalidate(self, ids: list[int]) -> None:
        """Tell every replica to drop its cached copies of `ids` (versions are re-read on next use)."""
        self.client.publish({int(i): -2 for i in ids})

    def editor(self) -> Any:
        """The `ttt.editor.Editor` over this context's clients (the model is loaded first)."""
        from srmoa_dist.ttt.editor import Editor

        self.load_model()
        if self._editor is None:
            self._editor = Editor(self.cfg, base=self.base, fusion=self.fusion, encoder=self.encoder,
                                  store=self.client, keystore=self.keystore, ledger=self.ledger,
                                  locality_prompts=LOCALITY_PROMPTS[: self.cfg.ttt.locality_probes],
                                  invalidate=self.invalidate)
        return self._editor

    def run_feedback(self, request: dict[str, Any], *, job_id: str | None = None) -> dict[str, Any]:
        """One feedback request (a FeedbackRequest dict) -> SR-TTT edit -> its result as JSON. Gravity
        goes on meanwhile: the trainer holds only the candidates' keys still (`KeyStore.hold`)."""
        return self.editor().run(request, job_id=job_id).to_json()

    def run_feedback_many(self, requests: list[dict[str, Any]], *, job_ids: list[str]) -> list[Any]:
        """Queued feedback requests trained together (`Editor.run_many`): per request its result as
        JSON, or the exception its edit raised."""
        out = self.editor().run_many(requests, job_ids=job_ids)
        return [r if isinstance(r, BaseException) else r.to_json() for r in out]

    def rollback(self, edit_id: str) -> dict[str, Any]:
        from srmoa_dist.ttt.edit import rollback

        if self._editor is not None:
            rec = self._editor.rollback(edit_id)
        else:
            rec = rollback(edit_id, store=self.client, keystore=self.keystore, ledger=self.ledger,
                           invalidate=self.invalidate, note="rolled back on request")
        return {"expert_id": rec.expert_id, "created": rec.created}


__all__ = ["EditContext", "LOCALITY_PROMPTS"]
