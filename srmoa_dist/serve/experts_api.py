"""What the ingress does for the expert routes: list, show, import, export, delete, and adapters as models.

    GET    /v1/experts                 catalog entries in the caller's reach (limit, after, namespace, origin)
    GET    /v1/experts/{id}            an expert: its record, key and catalog entry
    POST   /v1/experts                 import a PEFT LoRA adapter (server path or upload) with a name and
                                       example prompts; its key = normalize(mean(queries of the examples))
    GET    /v1/experts/{id}/adapter    the expert as PEFT adapter files (config JSON, base64 safetensors);
                                       a parallel MLP expert's: a LoRA on mlp.down_proj fitted to it
    DELETE /v1/experts/{id}            free its slot, delete its record, drop it from the catalog

An import is written in the order of an edit (`ttt.edit`): a pinned zero key in the caller's namespace
(unreachable: score 0), the expert's record, the key's real value, then the catalog entry; a failure
frees the slot. A delete makes the key unreachable first, then removes the record, publishes the
invalidation (every replica drops its cached copy), drops the catalog entry and appends a line to the
deletion log (``<data_dir>/deletions.jsonl``). An edit's expert is deleted by rolling its edit back
(DELETE /v1/edits/{id}): the ledger must say what happened to it.

`model` ``"<base model id>:<adapter name>"`` names a catalog entry of the caller's reach (own
namespace first, then the shared one); the request then runs on that expert alone, at gate 1.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.experts.catalog import CatalogEntry, ExpertCatalog, NameTakenError
from srmoa_dist.experts.peft_io import CONFIG_NAME, WEIGHTS_NAME
from srmoa_dist.serve.errors import APIError, bad_request, forbidden, not_found
from srmoa_dist.serve.tenants import Caller

log = logging.getLogger(__name__)

DELETIONS_NAME = "deletions.jsonl"
MAX_EXAMPLES = 32


def routing_key(queries: np.ndarray) -> np.ndarray:
    """The key of an imported expert from its examples' queries (n, d): the normalized mean of the
    normalized queries (LoraRetriever's pooled embedding of a LoRA's samples)."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[0] == 0:
        raise ValueError(f"queries must be (n >= 1, d_key), got {q.shape}")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    m = q.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


def check_geometry(targets: dict[str, tuple[int, int]], installed: dict[str, tuple[int, int]],
                   form: str) -> None:
    """An imported expert's targets {name: (d_in, d_out)} must be installed with the same shapes."""
    unknown = [n for n in targets if n not in installed]
    if unknown:
        have = sorted({n.split(".", 2)[-1] for n in installed})
        layers = sorted({int(n.split(".")[1]) for n in installed})
        raise bad_request(
            f"the adapter adapts {unknown[:3]}{'...' if len(unknown) > 3 else ''}, which this server does "
            f"not adapt: it serves expert.form {form!r} on {have} of layers {layers[0]}..{layers[-1]}",
            param="adapter.target_modules", code="adapter_mismatch")
    for n, shape in targets.items():
        if tuple(shape) != tuple(installed[n]):
            raise bad_request(f"the adapter's {n} maps {shape[0]} -> {shape[1]} features; the base model's "
                              f"maps {installed[n][0]} -> {installed[n][1]} (another base model?)",
                              param="adapter.hidden_size", code="adapter_mismatch")


def split_model(model: str, model_id: str) -> str | None:
    """The adapter name of ``"<model_id>:<name>"``, None for the bare model id; a 404 otherwise."""
    if model == model_id:
        return None
    base, sep, name = model.rpartition(":")
    if sep and base == model_id and name:
        return name
    raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_id}' and its "
                        f"adapters as '{model_id}:<adapter name>' (GET /v1/models)",
                   param="model", code="model_not_found")


class ExpertsService:
    """The expert routes' work (see the module docstring); `runtime` is a `bootstrap.Runtime`, `client`
    an `ExpertStoreClient`, `server` the ModelServer handle (queries and installed targets)."""

    def __init__(self, cfg: SrmoaConfig, runtime: Any, client: Any, server: Any, timeout_s: float) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.client = client
        self.server = server
        self.timeout = timeout_s
        self.catalog = ExpertCatalog.of(cfg.data_dir)
        self._exports: dict[tuple[int, str], dict[str, Any]] = {}    # (id, record digest) -> a fitted export

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _ray(self, ref: Any) -> Any:
        return await asyncio.wait_for(_as_future(ref), self.timeout)

    # -- reach ----------------------------------------------------------------------------------------

    @staticmethod
    def namespaces(c: Caller, wanted: str | None) -> Sequence[str] | None:
        """The namespaces a listing covers: `wanted` (which must be in reach unless admin), else the
        caller's reach (None for the admin: every namespace)."""
        if wanted is not None:
            if not c.admin and wanted not in c.reach:
                raise forbidden(f"namespace '{wanted}' is not yours: this key reaches {list(c.reach)}",
                                code="namespace_forbidden")
            return [wanted]
        return None if c.admin else list(c.reach)

    def _visible(self, c: Caller, expert_id: int) -> CatalogEntry | None:
        """The catalog entry of an expert the caller may see (404 when another tenant's)."""
        e = self.catalog.get(expert_id)
        if e is not None and not c.admin and e.namespace not in c.reach:
            raise not_found(f"no expert {expert_id}", param="expert_id", code="expert_not_found")
        return e

    def resolve(self, c: Caller, name: str) -> int:
        """The expert id of adapter `name` in the caller's reach (own namespace first)."""
        for ns in c.reach:
            e = self.catalog.by_name(ns, name)
            if e is not None:
                return e.id
        raise APIError(404, f"no adapter named '{name}' in namespaces {list(c.reach)} (GET /v1/models)",
                       param="model", code="model_not_found")

    def adapter_names(self, c: Caller) -> list[CatalogEntry]:
        entries, _ = self.catalog.list(namespaces=None if c.admin else c.reach, named=True, limit=1000)
        return entries

    # -- routes ---------------------------------------------------------------------------------------

    def list(self, c: Caller, *, limit: int, after: int | None, namespace: str | None,
             origin: str | None) -> dict[str, Any]:
        try:
            data, more = self.catalog.list(namespaces=self.namespaces(c, namespace), origin=origin,
                                           after=after, limit=limit)
        except ValueError as e:
            raise bad_request(str(e), param=str(e).split(" ", 1)[0], code="invalid_value") from None
        return {"object": "list", "data": [{**e.to_json(), "object": "expert"} for e in data],
                "has_more": more, "last_id": data[-1].id if data else None}

    def entry(self, c: Caller, expert_id: int) -> dict[str, Any] | None:
        e = self._visible(c, expert_id)
        return None if e is None else e.to_json()

    async def import_adapter(self, c: Caller, body: Any) -> dict[str, Any]:
        """POST /v1/experts (body: `schemas.ExpertImport`)."""
        from srmoa_dist.experts.peft_io import load_peft_adapter

        ns = body.namespace or c.namespace
        if not c.admin and ns != c.namespace:
            raise forbidden(f"this key imports into namespace '{c.namespace}' only, not '{ns}'",
                            code="namespace_forbidden")
        if self.catalog.by_name(ns, body.name) is not None:
            raise APIError(409, f"namespace '{ns}' already has an adapter named '{body.name}'",
                           param="name", code="name_taken")
        with tempfile.TemporaryDirectory(prefix="srmoa-import-") as tmp:
            src = Path(body.path) if body.path else _write_upload(Path(tmp), body.files)
            try:
                expert = await self._in_thread(
                    lambda: load_peft_adapter(src, dtype=self.cfg.expert.dtype))
            except FileNotFoundError as e:
                raise bad_request(str(e), param="path" if body.path else "files",
                                  code="adapter_not_found") from None
            except Exception as e:      # bad JSON, a config that is no mapping, unreadable safetensors
                raise bad_request(f"not an adapter this server can load: {type(e).__name__}: {e}"[:800],
                                  param="path" if body.path else "files", code="invalid_adapter") from None
        installed = {n: tuple(s) for n, s in (await self._ray(self.server.target_shapes.remote())).items()}
        check_geometry({n: (int(a.shape[1]), int(b.shape[0])) for n, (a, b) in expert.targets.items()},
                       installed, self.cfg.expert.form)
        queries = await self._ray(self.server.encode_prompts.remote(list(body.examples)))
        key = routing_key(queries)
        eid = await self._write(expert, key, ns)
        entry = CatalogEntry(id=eid, namespace=ns, origin="import", name=body.name, examples=body.examples)
        try:
            self.catalog.put(entry)
        except NameTakenError as e:                      # raced with another import of the name
            await self._free(eid)
            raise APIError(409, str(e), param="name", code="name_taken") from None
        log.info("imported adapter %r as expert %d in namespace %s (%d targets, rank %d)", body.name, eid, ns,
                 len(expert.targets), expert.rank)
        return {**entry.to_json(), "object": "expert", "rank": expert.rank, "targets": len(expert.targets)}

    async def _write(self, expert: Any, key: np.ndarray, ns: str) -> int:
        ks = self.runtime.keystore
        ids = await self._ray(ks.add.remote(np.zeros((1, key.shape[0]), np.float32), True, None, ns))
        eid = int(np.asarray(ids).reshape(-1)[0])
        try:
            versions = await self._in_thread(self.client.put_many, {eid: expert})
            await self._ray(ks.publish_versions.remote({eid: int(versions[eid])}))
            await self._ray(ks.update.remote([eid], key[None, :]))
        except BaseException:
            await self._free(eid)
            raise
        return eid

    async def _free(self, eid: int) -> None:
        try:
            await self._ray(self.runtime.keystore.free.remote([eid]))
        except Exception:
            log.exception("could not free slot %d after a failed import", eid)

    async def export_adapter(self, c: Caller, expert_id: int) -> dict[str, Any]:
        """GET /v1/experts/{id}/adapter: the PEFT adapter files of the expert. A LoRA-form expert's are
        exact; a parallel MLP expert's are a LoRA on mlp.down_proj fitted to it (serve/adapter_export.py,
        a Ray task with the model), with its measured agreement in `export` and srmoa_export.json."""
        from srmoa_dist.experts.codec import decode_expert
        from srmoa_dist.experts.peft_io import save_peft_adapter

        entry = self._visible(c, expert_id)
        raws = await self._in_thread(self.client.fetch_raw, [expert_id])
        raw = raws.get(expert_id)
        if raw is None:
            raise not_found(f"no expert {expert_id}", param="expert_id", code="expert_not_found")
        e = decode_expert(raw, expert_id=expert_id)
        if any(n.endswith(".mlp") for n in e.targets):
            key = (expert_id, hashlib.blake2b(bytes(raw), digest_size=16).hexdigest())
            out = self._exports.get(key)
            if out is None:                  # a fit takes a model and seconds: keep the last few
                out = await self._export_parallel(expert_id, e, entry)
                self._exports = {**dict(list(self._exports.items())[-7:]), key: out}
            return {"id": expert_id, "object": "expert.adapter", "version": e.version, **out}
        with tempfile.TemporaryDirectory(prefix="srmoa-export-") as tmp:
            save_peft_adapter(e, tmp, base_model_name_or_path=self.cfg.model.name_or_path)
            files = {CONFIG_NAME: (Path(tmp) / CONFIG_NAME).read_text(),
                     WEIGHTS_NAME: base64.b64encode((Path(tmp) / WEIGHTS_NAME).read_bytes()).decode()}
        exact = {"form": "lora", "method": "exact", "exact": True, "rank": e.rank, "alpha": e.alpha}
        return {"id": expert_id, "object": "expert.adapter", "version": e.version, "files": files,
                "export": exact}

    async def _export_parallel(self, expert_id: int, e: Any, entry: CatalogEntry | None) -> dict[str, Any]:
        """The fitted down_proj LoRA of a parallel expert, fit on its examples and its edits' prompts."""
        from srmoa_dist.runtime.torch_env import torch_runtime_env
        from srmoa_dist.serve.adapter_export import EXPORT_TIMEOUT_S, export_task, fit_prompts

        edits: list[dict[str, Any]] = []
        if entry is not None and entry.origin == "edit" and self.runtime.trainer is not None:
            edits = [r for r in await self._ray(self.runtime.trainer.list_edits.remote())
                     if r.get("expert_id") == expert_id]
        own, answers = fit_prompts(entry.examples if entry is not None else (), edits)
        if not own:
            raise APIError(409, f"expert {expert_id} has no example prompts (catalog) nor edit prompts "
                                "(ledger): its PEFT form is fitted on them", param="expert_id",
                           code="no_fit_prompts")
        try:
            task = export_task.options(runtime_env=torch_runtime_env(self.cfg))
            return await asyncio.wait_for(_as_future(task.remote(self.cfg, e, own, answers)),
                                          max(self.timeout, EXPORT_TIMEOUT_S))
        except ImportError as err:
            raise APIError(501, f"exporting a parallel MLP expert needs the model packages: {err}",
                           param="expert_id", code="export_unavailable") from None

    async def delete(self, c: Caller, expert_id: int) -> dict[str, Any]:
        """DELETE /v1/experts/{id} (see the module docstring)."""
        entry = self._visible(c, expert_id)
        if entry is None and not c.admin:
            raise not_found(f"no expert {expert_id} in namespaces {list(c.reach)}", param="expert_id",
                            code="expert_not_found")
        if entry is not None and entry.origin == "edit":
            raise APIError(409, f"expert {expert_id} was made by edit {entry.edit_id}: roll the edit back "
                                f"(DELETE /v1/edits/{entry.edit_id}) so that the ledger says so",
                           param="expert_id", code="expert_is_an_edit")
        ks = self.runtime.keystore
        info = await self._ray(ks.key_info.remote([expert_id]))
        held = (await self._in_thread(self.client.contains, [expert_id]))[0]
        if not held and (not info or info[0] is None):
            raise not_found(f"no expert {expert_id}", param="expert_id", code="expert_not_found")
        await self._ray(ks.free.remote([expert_id]))                       # unreachable first
        if held:
            await self._in_thread(self.client.delete, [expert_id])
        await self._ray(ks.publish_versions.remote({expert_id: -1}))       # replicas drop their copies
        self.catalog.remove(expert_id)
        _append_line(Path(self.cfg.data_dir) / DELETIONS_NAME, {
            "expert_id": expert_id, "at": time.time(), "namespace": entry.namespace if entry else None,
            "name": entry.name if entry else None, "origin": entry.origin if entry else None})
        log.info("deleted expert %d (%s)", expert_id, entry.name if entry else "not in the catalog")
        return {"id": expert_id, "object": "expert.deleted", "deleted": True}


def _write_upload(tmp: Path, files: dict[str, Any] | None) -> Path:
    """An upload's files {adapter_config.json: JSON text or object, adapter_model.safetensors: base64}
    written as an adapter directory."""
    if not files:
        raise bad_request("give 'path' (a directory on the server) or 'files' (the adapter's files)",
                          param="path", code="invalid_value")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in files]
    if missing:
        raise bad_request(f"files lacks {missing}: an adapter is {CONFIG_NAME} and {WEIGHTS_NAME} (base64)",
                          param="files", code="invalid_value")
    cfg = files[CONFIG_NAME]
    (tmp / CONFIG_NAME).write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    try:
        (tmp / WEIGHTS_NAME).write_bytes(base64.b64decode(str(files[WEIGHTS_NAME]), validate=True))
    except (binascii.Error, ValueError):
        raise bad_request(f"files.{WEIGHTS_NAME} is not base64", param=f"files.{WEIGHTS_NAME}",
                          code="invalid_value") from None
    return tmp


def _append_line(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


async def _as_future(ref: Any) -> Any:
    return await ref


__all__ = ["ExpertsService", "routing_key", "check_geometry", "split_model"]
