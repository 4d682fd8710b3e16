"""`srmoa bench feedback`: SR-TTT through the HTTP API, several facts per entity, as a user meets it.

One local Ray cluster and the app on a fresh store (`srmoa serve` as a new user starts it). Then:

1. sequential: for each fact, `POST /v1/feedback` (the question, the base model's answer from
   `/v1/chat/completions`, the correct answer), polled until the job is done: the wall time from the
   POST to the verified (or rolled back) edit, and the phase timings the job result reports;
2. queued (`--queued N`): N more facts posted at once, then waited for: the time until all are done,
   and each job's time from its creation to its answer (a job is answered when its own batch settles);
3. free greedy generation through `/v1/chat/completions` of every trained question, held-out
   paraphrase and unedited question about an edited entity, and the probes with `n_strangers`
   questions about invented entities no edit is about (their answers before any edit are the
   reference): reliability, generalization, locality (`locality_invented`: the strangers' alone), leak
   (as `bench lifelong`).

The JSON has `edit_seconds_p50` / `edit_seconds_p90` (sequential), `queued` (count, seconds,
`job_seconds_p50` / `job_seconds_p90`), the metrics, every edit's record, and every question's output
(`outputs`: what was asked, what came back, and its verdict, so a wrong answer or a leak can be traced).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from srmoa_dist.bench.entity_facts import Entity, entities_and_strangers
from srmoa_dist.bench.facts import make_probes
from srmoa_dist.bench.model_cache import link_shared_model_cache
from srmoa_dist.bench.ttt_bench import contains_any
from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

TARGETS = {"edit_seconds_p50": 8.0, "edit_seconds_p90": 15.0, "queued_100_seconds": 300.0}


def _chat(c: httpx.Client, model: str, text: str, max_tokens: int) -> dict[str, Any]:
    r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens, "temperature": 0,
                                             "messages": [{"role": "user", "content": text}]})
    r.raise_for_status()
    return r.json()


def _wait(c: httpx.Client, job_id: str, timeout_s: float = 1200.0) -> dict[str, Any]:
    t0 = time.monotonic()
    while True:
        # a long poll: the trainer answers when the job finishes (a 10 Hz poll cost ~5 s an edit here)
        job = c.get(f"/v1/feedback/{job_id}", params={"wait": 10}).json()
        if job["status"] not in ("pending", "running") or time.monotonic() - t0 > timeout_s:
            return job


def _job_record(job: dict[str, Any], seconds: float) -> dict[str, Any]:
    res = job.get("result") or {}
    return {"job": job["status"], "edit": res.get("status"), "seconds": seconds,
            "expert_id": res.get("expert_id"), "steps": res.get("steps"),
            "neighbours": len(res.get("neighbours") or []), "reason": res.get("reason"),
            "timings": res.get("timings") or {}, "error": job.get("error")}


def _job_seconds(job: dict[str, Any]) -> float:
    """Seconds from the job's creation to its answer, by the trainer's clock (nan while unfinished)."""
    if job.get("finished") is None or job.get("created") is None:
        return float("nan")
    return float(job["finished"]) - float(job["created"])


def run_feedback_bench(out: Path, *, edits: int = 24, facts_per_entity: int = 3, queued: int = 0,
                       model: str = "smollm2", max_tokens: int = 24, n_probes: int = 12,
                       n_strangers: int = 6, seed: int = 0, data_dir: Path | None = None,
                       cfg: SrmoaConfig | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write the JSON to `out` and return it. `cfg`: the
    config a fresh store starts from (a store's own config.yaml wins; None: the defaults)."""
    import dataclasses

    from srmoa_dist.runtime.store_init import load_config
    from srmoa_dist.serve import local

    n_ent = -(-(edits + queued) // facts_per_entity)
    entities, strangers = entities_and_strangers(n_ent, n_strangers, facts_per_entity, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="srmoa-bench-feedback-")) if data_dir is None else None
    data_dir = Path(tmp or data_dir)
    cfg = load_config(data_dir, default=cfg)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, name_or_path=model))
    link_shared_model_cache(data_dir, model)
    facts = [(e, f) for e in entities for f in e.facts][: edits + queued]
    probes = list(make_probes(seed, n_locality=n_probes, n_near_miss=n_probes // 3).locality)
    app = local.start(cfg, host="127.0.0.1", port=0, say=say)
    doc: dict[str, Any] = {"benchmark": "feedback",
                           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                           "model": model, "edits": edits, "queued_edits": queued,
                           "facts_per_entity": facts_per_entity, "targets": TARGETS}
    try:
        with httpx.Client(base_url=app.url, timeout=1200) as c:
            mid = c.get("/v1/models").json()["data"][0]["id"]
            before = {p: _chat(c, mid, p, max_tokens)["choices"][0]["message"]["content"]
                      for p in [*probes, *strangers]}
            records = []
            for i, (e, f) in enumerate(facts[:edits]):
                wrong = _chat(c, mid, f.question, max_tokens)["choices"][0]["message"]["content"]
                t0 = time.monotonic()
                job = c.post("/v1/feedback", json={"prompt": f.question, "response": wrong,
                                                    "correct_answer": f.answer}).json()
                job = _wait(c, job["job_id"])
                rec = {"fact": f.fact_id, "entity": e.name, "relation": f.relation,
                       **_job_record(job, time.monotonic() - t0)}
                records.append(rec)
                say(f"edit {i + 1}/{edits} {f.question!r}: {rec['edit']} in {rec['seconds']:.1f} s "
                    f"({rec['neighbours']} neighbours)")
            doc["records"] = records
            secs = [r["seconds"] for r in records if r["job"] == "done"]
            doc["edit_seconds_p50"] = float(np.percentile(secs, 50)) if secs else None
            doc["edit_seconds_p90"] = float(np.percentile(secs, 90)) if secs else None
            doc["phase_seconds_p50"] = {k: float(np.median([r["timings"][k] for r in records
                                                            if k in r["timings"]]))
                                        for k in ("reflect_s", "train_s", "commit_s", "verify_s", "total_s")
                                        if any(k in r["timings"] for r in records)}
            if queued:
                t0 = time.monotonic()
                jobs = [c.post("/v1/feedback", json={"prompt": f.question, "correct_answer": f.answer}).json()
                        for _, f in facts[edits:]]
                done = [_wait(c, j["job_id"]) for j in jobs]
                waited = [_job_seconds(j) for j in done]              # posted -> answered, per job
                doc["queued"] = {"count": queued, "seconds": time.monotonic() - t0,
                                 "job_seconds_p50": float(np.nanpercentile(waited, 50)),
                                 "job_seconds_p90": float(np.nanpercentile(waited, 90)),
                                 "records": [_job_record(j, w) for j, w in zip(done, waited)]}
                say(f"{queued} queued edits done in {doc['queued']['seconds']:.0f} s (each answered after "
                    f"{doc['queued']['job_seconds_p50']:.0f} s p50)")
            ask = lambda t: _chat(c, mid, t, max_tokens)["choices"][0]["message"]["content"]
            doc["metrics"], doc["outputs"] = _evaluate(ask, entities, facts, probes, strangers, before)
            doc["stats"] = c.get("/v1/stats").json()
    finally:
        local.stop(app)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    say(json.dumps({k: doc.get(k) for k in ("edit_seconds_p50", "edit_seconds_p90", "phase_seconds_p50",
                                             "metrics")}, indent=1))
    return doc


def _evaluate(ask: Callable[[str], str], entities: Sequence[Entity], facts: Sequence[tuple[Entity, Any]],
              probes: Sequence[str], strangers: Sequence[str], before: dict[str, str]
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Free greedy generation (`ask`: a question -> the API's greedy answer): reliability,
    generalization, locality (the probes and the strangers' questions: about invented entities no edit is
    about, also on their own), leak. Returns the metrics and every question's output (kind, prompt, the
    answers judged against or the text expected, the text, and its verdict: answered / unchanged)."""
    outputs: list[dict[str, Any]] = []

    def answered(kind: str, prompt: str, answers: Sequence[str]) -> bool:
        text = ask(prompt)
        ok = contains_any(text, answers)
        outputs.append({"kind": kind, "prompt": prompt, "answers": list(answers), "text": text, "ok": ok})
        return ok

    def unchanged(kind: str, prompt: str) -> bool:
        text = ask(prompt)
        ok = text == before[prompt]
        outputs.append({"kind": kind, "prompt": prompt, "expected": before[prompt], "text": text, "ok": ok})
        return ok

    done = {f.fact_id for _, f in facts}
    rel = [answered("trained", f.question, [f.answer]) for _, f in facts]
    gen = [answered("held_out", h, [f.answer]) for _, f in facts for h in f.held_out]
    leak = [answered("unedited", e.unedited, answers) for e in entities
            if (answers := [f.answer for f in e.facts if f.fact_id in done])]
    loc = [unchanged("probe", p) for p in probes]
    inv = [unchanged("stranger", p) for p in strangers]
    mean = lambda xs: float(np.mean(xs)) if xs else None
    metrics = {"reliability": mean(rel), "generalization": mean(gen), "locality": mean(loc + inv),
               "leak": mean(leak), "locality_invented": mean(inv),
               "n": {"trained": len(rel), "held_out": len(gen), "probe": len(loc), "stranger": len(inv),
                     "unedited": len(leak)}}
    return metrics, outputs


__all__ = ["run_feedback_bench"]
