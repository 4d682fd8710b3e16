"""The export route's model-side work: a parallel-MLP expert as a fitted PEFT LoRA (a Ray task).

A LoRA-form expert exports exactly (`peft_io.save_peft_adapter`, no model needed). A parallel-MLP
expert has no PEFT form; `experts/peft_distill.py` fits a LoRA on each adapted layer's
``mlp.down_proj`` to it, which needs the base model, and the ingress holds none. So the route runs
`export_parallel` as a Ray task (``num_cpus=0``: an admin's occasional call must not wait for a free
core): it loads the base model as a ModelServer replica does (``cfg.model``, the store's model cache),
installs the same fusion, fits on the expert's own prompts plus generic ones, measures the result with
real ``peft`` against the served expert at gate 1, and returns the adapter's files with the report.

    fit_prompts(examples, edits)       the expert's own prompts and its edits' answered training chats
    export_parallel(cfg, expert, ...)  -> {"files": {name: text or base64}, "export": report JSON}
    export_task                        the Ray remote of export_parallel
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ray

from srmoa_dist.config import SrmoaConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.peft_io import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

LIVE_EDITS = ("committed", "verified")      # ttt/ledger.py: the edits in force
EXPORT_TIMEOUT_S = 900.0


def fit_prompts(examples: Iterable[str], edits: Iterable[dict[str, Any]]
                ) -> tuple[list[Any], list[list[dict[str, str]]]]:
    """(own prompts, answered chats) of an expert: its catalog examples, and of each edit in force
    (ledger JSON) its question and training prompts (each also with its target answer)."""
    own: list[Any] = []
    answers: list[list[dict[str, str]]] = []
    seen: set[str] = set()

    def add(p: Any) -> None:
        key = repr([{"role": "user", "content": p}] if isinstance(p, str) else p)
        if key not in seen:
            seen.add(key)
            own.append(p)

    for e in examples:
        if isinstance(e, str) and e.strip():
            add(e)
    for rec in edits:
        if rec.get("status") not in LIVE_EDITS:
            continue
        if rec.get("question"):
            add(str(rec["question"]))
        for p in rec.get("prompts") or ():
            msgs = [{"role": m["role"], "content": m["content"]} for m in p.get("messages") or ()]
            if not msgs or msgs[-1]["role"] != "user":
                continue
            add(msgs)
            if p.get("target"):
                answers.append([*msgs, {"role": "assistant", "content": str(p["target"])}])
    return own, answers


def export_parallel(cfg: SrmoaConfig, expert: LoRAExpert, own: Sequence[Any],
                    answers: Sequence[Any] = ()) -> dict[str, Any]:
    """Fit, write and measure the down_proj LoRA of a parallel expert on a freshly loaded base model."""
    from srmoa_dist.experts.peft_distill import GENERIC_PROMPTS, REPORT_NAME, PeftDistiller
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.loading import load_base_model, set_torch_threads
    from srmoa_dist.runtime.edit_context import LOCALITY_PROMPTS

    set_torch_threads(cfg.runtime.torch_threads)
    base = load_base_model(cfg.model, cfg.model_cache_dir)
    fusion = ExpertFusion(base.model, cfg.expert, cfg.model.query_layer)
    try:
        with tempfile.TemporaryDirectory(prefix="srmoa-export-") as tmp:
            report = PeftDistiller(base, fusion, expert).run(
                own, GENERIC_PROMPTS, LOCALITY_PROMPTS, tmp, answers=answers,
                base_model_name_or_path=cfg.model.name_or_path)
            d = Path(tmp)
            files = {CONFIG_NAME: (d / CONFIG_NAME).read_text(),
                     WEIGHTS_NAME: base64.b64encode((d / WEIGHTS_NAME).read_bytes()).decode(),
                     REPORT_NAME: (d / REPORT_NAME).read_text()}
    finally:
        fusion.remove()
    return {"files": files, "export": report.to_json()}


export_task = ray.remote(num_cpus=0, max_retries=0)(export_parallel)

__all__ = ["export_parallel", "export_task", "fit_prompts"]
