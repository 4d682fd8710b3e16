"""What the trainer actor needs to run SR-TTT edits against the running store.

`EditContext` wires `ttt.edit.apply_edit` / `ttt.edit.rollback` to the Ray layer: the expert store is
an `ExpertStoreClient` over the shard actors (its writes publish cache invalidations, so serving
replicas drop old copies before the edited key is routed to), the key store a `KeyStoreProxy` over the
key-store actor, the ledger a local `EditLedger` under data_dir/ledger. The base model, query encoder
and fusion are loaded on first use (`load_model`).

Namespaces: a feedback request carrying "namespace" (its tenant's, set by the ingress) and "reach"
(that namespace and the shared one) is edited on a `routing.namespaces.NamespaceView` of the key store:
its neighbours, its router loss and its verification see only the keys it reaches, and a new expert's
key goes into its namespace. Every committed edit is registered in the expert catalog (origin "edit").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
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
        self._ns_editors: dict[tuple[str, tuple[str, ...]], Any] = {}
        from srmoa_dist.experts.catalog import ExpertCatalog

        self.catalog = ExpertCatalog.of(cfg.data_dir)

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

    def ns_editor(self, namespace: str | None, reach: Any = None) -> Any:
        """The editor of a namespace (None: the whole key store), on a `NamespaceView` of the key store."""
        if namespace is None:
            return self.editor()
        from srmoa_dist.routing.namespaces import NamespaceView
        from srmoa_dist.ttt.editor import Editor

        key = (namespace, tuple(sorted(set(reach or ()) | {namespace})))
        if key not in self._ns_editors:
            base = self.editor()
            self._ns_editors[key] = Editor(
                self.cfg, base=self.base, fusion=self.fusion, encoder=self.encoder, store=self.client,
                keystore=NamespaceView(self.keystore, namespace, key[1]), ledger=self.ledger,
                locality_prompts=base.locality_prompts, invalidate=self.invalidate)
        return self._ns_editors[key]

    def run_feedback_many(self, requests: list[dict[str, Any]], *, job_ids: list[str],
                          on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Queued feedback requests trained together (`Editor.run_many`), one run per namespace: per
        request its result as JSON, or the exception its edit raised; `on_result(i, that)` as soon as
        request i's batch has settled."""
        groups: dict[tuple[str | None, tuple[str, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.get("namespace"), tuple(r.get("reach") or ())), []).append(i)
        out: list[Any] = [None] * len(requests)
        for (ns, reach), idx in groups.items():
            def settled(j: int, r: Any, idx: list[int] = idx, ns: str | None = ns) -> None:
                i = idx[j]
                out[i] = r if isinstance(r, BaseException) else self._catalogued(r.to_json(), ns, requests[i])
                if on_result is not None:
                    on_result(i, out[i])

            self.ns_editor(ns, reach).run_many([requests[i] for i in idx], job_ids=[job_ids[i] for i in idx],
                                               on_result=settled)
        return out

    def _catalogued(self, res: dict[str, Any], namespace: str | None, request: dict[str, Any]
                    ) -> dict[str, Any]:
        """Register a committed edit's expert in the catalog (origin "edit"); an imported expert it
        refined keeps its entry."""
        from srmoa_dist.experts.catalog import CatalogEntry

        eid = int(res.get("expert_id", -1))
        if res.get("status") not in ("verified", "committed") or eid < 0:
            return res
        try:
            old = self.catalog.get(eid)
            if old is None or old.origin == "edit":
                msgs = request.get("messages") or [{"content": request.get("prompt") or ""}]
                question = str(msgs[-1].get("content") or "")
                self.catalog.put(CatalogEntry(id=eid, namespace=namespace or "default", origin="edit",
                                              examples=(question,) if question else (),
                                              edit_id=res.get("edit_id")))
        except Exception:            # the catalog describes; the edit stands without its entry
            log.exception("could not register edit %s's expert %d in the catalog", res.get("edit_id"), eid)
        return res

    def rollback(self, edit_id: str) -> dict[str, Any]:
        from srmoa_dist.ttt.edit import rollback

        if self._editor is not None:
            rec = self._editor.rollback(edit_id)
        else:
            rec = rollback(edit_id, store=self.client, keystore=self.keystore, ledger=self.ledger,
                           invalidate=self.invalidate, note="rolled back on request")
        if rec.created:
            entry = self.catalog.get(rec.expert_id)
            if entry is not None and entry.edit_id == edit_id:
                self.catalog.remove(rec.expert_id)
        return {"expert_id": rec.expert_id, "created": rec.created}


__all__ = ["EditContext", "LOCALITY_PROMPTS"]
