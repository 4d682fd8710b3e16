"""`srmoa bench ttt`: N sequential SR-TTT edits of invented facts, judged by free greedy generation.

One run, one process, one machine:

1. Setup: the base model, `ExpertFusion`, the query encoder (calibrated on generic prompts), an on-disk
   `ShardedExpertStore`, `KeyStore` (exact index) and `EditLedger` under a fresh directory.
2. Deferral threshold tau: calibrated (unless given) on facts and prompts disjoint from the evaluation:
   for `n_cal` other invented facts a proxy key (the unit mean query of its 4 training prompts, where the
   trainer starts a key from) scores its held-out paraphrases and spare phrasings (positives); the
   calibration negatives (generic prompts and near-misses: same relation, a real entity) score their
   best proxy key; `calibrate_tau` keeps `model.false_route_rate` of the negatives at most.
3. The base model answers every evaluation prompt (greedy): the `baseline_base` figures, the failing
   responses of the edits, and the reference outputs of the locality probes.
4. N edits, one after another, each through the real SR-TTT path `ttt.edit.apply_edit`: the failure
   (question, the base model's wrong answer, the correct answer and the rule), 4 prompts from
   `diversify` (held-out paraphrases excluded), training, commit (store, key store, ledger), verification
   (re-ask and the edit's own locality probes, disjoint from the evaluation probes; else rolled back).
5. After all N edits, free greedy generation of every evaluation prompt, for each variant:
   - `sr_ttt` (top-level fields): routed generation (query -> key store -> experts above tau);
   - `baseline_base`: the base model alone;
   - `baseline_rule_in_context`: the base model with the routed edit's rule (from the ledger) put before
     the question in the user message; no route (all scores under tau) -> no rule, the base output;
   - `combined`: the routed expert and its rule in context together.
   Routing is computed on the question as asked (the rule is added afterwards), once for all variants.

Metrics (each in [0, 1]):
    reliability        the 4 trained prompts of each edit answered right (answer contained, case-insensitive)
    generalization     the 2 held-out paraphrases of each edit answered right
    locality           shared probes (generic + near-misses) whose greedy tokens equal the base model's
    routing_precision  held-out paraphrases routed top-1, above tau, to their own edit's expert
plus edit_seconds_p50 (wall time of one apply_edit) and peak_rss_mb (peak resident memory of the process).

Shapes: P prompts, k experts per query, d d_key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srmoa_dist.bench.facts import Fact, ProbeSets, make_facts, make_probes
from srmoa_dist.bench.model_cache import shared_model_cache
from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]
VARIANTS = ("sr_ttt", "baseline_base", "baseline_rule_in_context", "combined")
METRICS = ("reliability", "generalization", "locality", "routing_precision", "edit_seconds_p50",
           "peak_rss_mb")
TARGETS = {"reliability": 0.95, "generalization": 0.80, "locality": 0.99, "edit_seconds_p50": 20.0}


@dataclasses.dataclass(frozen=True)
class _Prompt:
    """One evaluation prompt: its chat, which fact it belongs to (-1 for a probe) and its role."""

    chat: Chat
    fact: int            # index into facts, -1 for a locality probe
    kind: str            # "trained" | "held_out" | "probe"
    structure: str = ""  # diversify structure of a trained prompt; "near_miss" | "generic" for probes


def contains_answer(text: str, answer: str) -> bool:
    """The benchmark's judge: the answer string inside the reply (case- and whitespace-insensitive)."""
    norm = lambda s: " ".join(s.lower().split())
    return norm(answer) in norm(text)


def contains_any(text: str, answers: Sequence[str]) -> bool:
    """The judge of a question with several accepted answers: one of them is inside the reply."""
    return any(contains_answer(text, a) for a in answers)


def with_rule(chat: Sequence[dict[str, str]], rule: str) -> Chat:
    """The chat with `rule` put before the content of its last user message."""
    out = [dict(m) for m in chat]
    u = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[u]["content"] = f"{rule}\n\n{out[u]['content']}"
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _machine() -> dict[str, Any]:
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(), "loadavg_at_start": load}


def _load1() -> float | None:
    """The 1-minute load average (edit timings on a shared machine swing with it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def bench_store_config(name: str, out: Path, data_dir: Path | None,
                       cfg: SrmoaConfig | None) -> tuple[Path | None, SrmoaConfig]:
    """A fresh store directory `name` under data_dir (or a new temp dir, returned to remove after) and
    the config pointing at it, with an exact CPU index; the output's folder is created too."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"srmoa-{name}-")) if data_dir is None else None
    root = (tmp if tmp is not None else Path(data_dir)) / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = cfg or SrmoaConfig()
    return tmp, cfg.replace(data_dir=str(root),
                            keystore=dataclasses.replace(cfg.keystore, index="exact", device="cpu"))


# ---------------------------------------------------------------------------------------------- generation
def _generate_all(base: Any, fusion: Any, encoder: Any, chats: Sequence[Chat], *, params: Any,
                  router_for: Callable[[list[int]], Any] | None, fetch: Any, batch_size: int,
                  desc: str, expected: Sequence[Any] | None = None) -> list[Any]:
    """Greedy generations of `chats` in batches of similar length (same batches for the same chats).

    router_for(rows) -> the Router of the batch made of those rows (None: the plain base model).
    expected: per chat, a `model.greedy_check.Expected` output (or None); those confirmed in one forward
    are not decoded (a confirmed output is what decoding gives, see `model.greedy_check`)."""
    from srmoa_dist.model.generation import generate, make_route_step
    from srmoa_dist.model.greedy_check import confirm_greedy

    order = sorted(range(len(chats)), key=lambda i: (len(chats[i][-1]["content"]), i))
    out: list[Any] = [None] * len(chats)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False, disable=None):
        rows = order[s:s + batch_size]
        known = [i for i in rows if expected is not None and expected[i] is not None]
        if known:
            router = router_for(known) if router_for is not None else None
            step = make_route_step(router, fetch, params.gate_temperature) if router is not None else None
            got = confirm_greedy(base, fusion if router is not None else None,
                                 encoder if router is not None else None,
                                 [chats[i] for i in known], [expected[i] for i in known], step)
            for i, g in zip(known, got):
                out[i] = g
        todo = [i for i in rows if out[i] is None]
        if not todo:
            continue
        router = router_for(todo) if router_for is not None else None
        gens = generate(base, fusion if router is not None else None, encoder if router is not None else None,
                        [chats[i] for i in todo], router, fetch if router is not None else None, params)
        for i, g in zip(todo, gens):
            out[i] = g
    return out


def _fixed_router(ids: Sequence[Sequence[int]], scores: Sequence[Sequence[float]], k: int):
    """A Router that returns a routing decided beforehand (one row per chat of the batch)."""
    B = len(ids)
    I = np.full((B, k), -1, np.int64)
    D = np.full((B, k), -np.inf, np.float32)
    for b, (ii, ss) in enumerate(zip(ids, scores)):
        n = min(len(ii), k)
        I[b, :n] = ii[:n]
        D[b, :n] = ss[:n]

    def router(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert xq.shape[0] == B
        return D.copy(), I.copy()
    return router


# ---------------------------------------------------------------------------------------------- tau
def calibrate_deferral(base: Any, encoder: Any, cal_facts: Sequence[Fact], negatives: Sequence[str],
                       false_route_rate: float) -> tuple[float, dict[str, Any]]:
    """tau from proxy keys of calibration facts (see the module docstring) and its calibration figures."""
    from srmoa_dist.model.generation import queries
    from srmoa_dist.routing.query_encoder import calibrate_tau
    from srmoa_dist.ttt.detect import explicit_failure
    from srmoa_dist.ttt.diversify import diversify

    def q(texts: Sequence[Chat]) -> np.ndarray:
        return np.concatenate([queries(base, encoder, list(texts[i:i + 32]))
                               for i in range(0, len(texts), 32)])

    keys, pos_chats, pos_owner = [], [], []
    for j, f in enumerate(cal_facts):
        fail = explicit_failure(f.question, "", correct_answer=f.answer, rule=f.rule)
        prompts = diversify(fail, f.rule, exclude=f.held_out)
        qs = q([list(p.messages) for p in prompts])                         # (4, d)
        m = qs.mean(0)
        keys.append(m / max(float(np.linalg.norm(m)), 1e-12))
        for t in f.held_out + f.train[1:]:
            pos_chats.append([{"role": "user", "content": t}])
            pos_owner.append(j)
    K = np.stack(keys).astype(np.float32)                                   # (F, d)
    pos = np.einsum("pd,pd->p", q(pos_chats), K[pos_owner])                 # (P,) own key
    neg_all = q([[{"role": "user", "content": t}] for t in negatives]) @ K.T   # (Nn, F)
    neg = neg_all.max(1)                                                    # best key of each negative
    tau = calibrate_tau(pos, neg, false_route_rate)
    info = {"method": "proxy keys (unit mean query of the 4 training prompts) of held-out facts",
            "n_facts": len(cal_facts), "n_positives": int(pos.size), "n_negatives": int(neg.size),
            "false_route_rate": false_route_rate, "tau": tau,
            "positive_recall": float((pos >= tau).mean()), "negative_pass": float((neg >= tau).mean()),
            "positive_scores_p10_p50": [float(np.percentile(pos, 10)), float(np.percentile(pos, 50))],
            "negative_scores_max_p99": [float(neg.max()), float(np.percentile(neg, 99))]}
    return tau, info


# ---------------------------------------------------------------------------------------------- metrics
def _variant_metrics(prompts: Sequence[_Prompt], facts: Sequence[Fact], gens: Sequence[Any],
                     base_gens: Sequence[Any], top1: Sequence[int | None] | None,
                     fact_expert: dict[int, int]) -> dict[str, Any]:
    """reliability, generalization, locality, routing_precision (+ side figures) of one variant."""
    ok = {"trained": [], "held_out": []}
    same, same_near, same_generic = [], [], []
    routed_right, routed_trained, probe_routed = [], [], []
    by_structure: dict[str, list[bool]] = {}
    for i, (p, g) in enumerate(zip(prompts, gens)):
        if p.kind == "probe":
            eq = list(g.token_ids) == list(base_gens[i].token_ids)
            same.append(eq)
            (same_near if p.structure == "near_miss" else same_generic).append(eq)
            if top1 is not None:
                probe_routed.append(top1[i] is not None)
            continue
        f = facts[p.fact]
        hit = contains_answer(g.text, f.answer)
        ok[p.kind].append(hit)
        if p.kind == "trained":
            by_structure.setdefault(p.structure, []).append(hit)
        if top1 is not None:
            right = top1[i] is not None and top1[i] == fact_expert.get(p.fact, -2)
            (routed_right if p.kind == "held_out" else routed_trained).append(right)
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {
        "reliability": mean(ok["trained"]),
        "generalization": mean(ok["held_out"]),
        "locality": mean(same),
        "routing_precision": mean(routed_right),
        "routing_trained": mean(routed_trained),
        "probe_false_route_rate": mean(probe_routed),
        "locality_near_miss": mean(same_near),
        "locality_generic": mean(same_generic),
        "reliability_by_structure": {k: mean(v) for k, v in sorted(by_structure.items())},
    }


def _p50(xs: Sequence[float]) -> float | None:
    return float(np.percentile(xs, 50)) if len(xs) else None


# ---------------------------------------------------------------------------------------------- the run
def run_ttt_bench(
    n_edits: int,
    out: Path,
    data_dir: Path | None = None,
    seed: int = 0,
    with_rule_option: bool = True,
    *,
    cfg: SrmoaConfig | None = None,
    base: Any = None,
    tau: float | None = None,
    n_probes: int = 20,
    n_near_miss: int = 8,
    n_cal: int | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    verify: bool = True,
    say: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write the JSON to `out` and return it.

    data_dir: where the stores are built (a fresh `ttt_bench` directory inside it; default a temp dir);
    cfg: the config to start from (default `SrmoaConfig()`: the default model and TTT settings);
    base: an already loaded BaseModel (tests; default `load_base_model(cfg.model, ...)`);
    tau: the deferral threshold (None: calibrated, see `calibrate_deferral`);
    n_cal: calibration facts for tau (default max(n_edits, 10)); say: where the summary table goes.
    """
    from srmoa_dist.experts.store import ShardedExpertStore
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.generation import GenerationParams, generate
    from srmoa_dist.model.loading import load_base_model
    from srmoa_dist.routing.encoder_cache import calibrated
    from srmoa_dist.routing.keystore import KeyStore
    from srmoa_dist.routing.relation_gate import gated, search_slack
    from srmoa_dist.ttt.detect import explicit_failure
    from srmoa_dist.ttt.diversify import diversify
    from srmoa_dist.ttt.edit import apply_edit
    from srmoa_dist.ttt.edit_env import make_fetch, make_router
    from srmoa_dist.ttt.ledger import EditLedger

    if n_edits <= 0:
        raise ValueError(f"n_edits must be positive, got {n_edits}")
    t_run = time.perf_counter()
    out = Path(out)
    tmp, cfg = bench_store_config("ttt_bench", out, data_dir, cfg)
    machine = _machine()
    fusion = store = keystore = None
    try:
        # 1. model, fusion, encoder ------------------------------------------------------------------
        t0 = time.perf_counter()
        if base is None:
            cache = Path(data_dir) / "model_cache" if data_dir is not None else None
            if cache is None or not cache.exists():
                cache = shared_model_cache()
            base = load_base_model(cfg.model, cache)
        fusion = ExpertFusion(base.model, cfg.expert, query_layer=base.query_layer)
        encoder = gated(base, calibrated(base, cfg.keystore.d_key, shared_model_cache() / "encoders"),
                        shared_model_cache() / "encoders")
        setup_s = time.perf_counter() - t0

        # 2. data and tau ----------------------------------------------------------------------------
        facts = make_facts(n_edits, seed)
        probes: ProbeSets = make_probes(seed, n_locality=n_probes, n_near_miss=n_near_miss)
        names = [f.entity for f in facts] + [f.answer for f in facts]
        cal_facts = make_facts(n_cal or max(n_edits, 10), seed + 100_003, avoid=names)
        if tau is None:
            tau, tau_info = calibrate_deferral(base, encoder, cal_facts, probes.calibration,
                                               cfg.model.false_route_rate)
        else:
            tau_info = {"method": "given", "tau": float(tau)}
        cfg = cfg.replace(keystore=dataclasses.replace(cfg.keystore, tau=float(tau)))
        log.info("tau %.4f (%s)", tau, tau_info["method"])

        # the evaluation prompts: 4 trained (diversify's) + 2 held-out per fact, then the probes
        train_prompts = []
        prompts: list[_Prompt] = []
        for j, f in enumerate(facts):
            tp = diversify(explicit_failure(f.question, "", correct_answer=f.answer, rule=f.rule), f.rule,
                           exclude=f.held_out)
            train_prompts.append(tp)
            prompts += [_Prompt([dict(m) for m in p.messages], j, "trained", p.structure) for p in tp]
            prompts += [_Prompt([{"role": "user", "content": h}], j, "held_out") for h in f.held_out]
        n_generic = len(probes.locality) - probes.n_near_miss
        prompts += [_Prompt([{"role": "user", "content": t}], -1, "probe", "generic" if i < n_generic else
                            "near_miss") for i, t in enumerate(probes.locality)]
        chats = [p.chat for p in prompts]
        params = GenerationParams(max_new_tokens=max_new_tokens)

        # 3. the base model ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        base_gens = _generate_all(base, None, None, chats, params=params, router_for=None, fetch=None,
                                  batch_size=batch_size, desc="base model")
        base_eval_s = time.perf_counter() - t0
        rss_base = peak_rss_mb()
        instr = {p.fact: i for i, p in enumerate(prompts)
                 if p.kind == "trained" and p.structure == "instruction"}
        base_known = [contains_answer(base_gens[instr[j]].text, f.answer) for j, f in enumerate(facts)]
        # the edit's own locality check compares to these (what apply_edit would compute on an empty store)
        verify_chats = [[{"role": "user", "content": t}] for t in probes.verify]
        vparams = GenerationParams(max_new_tokens=cfg.ttt.verify_max_new_tokens)
        verify_before = [g.token_ids for g in generate(base, None, None, verify_chats, params=vparams)]

        # 4. the edits --------------------------------------------------------------------------------
        store = ShardedExpertStore(cfg.shards_dir, cfg.store)
        keystore = KeyStore.open(cfg.keystore_dir, cfg.keystore, cfg.gravity)
        ledger = EditLedger(cfg.ledger_dir)
        edits: list[dict[str, Any]] = []
        fact_expert: dict[int, int] = {}
        bar = tqdm(facts, desc=f"SR-TTT edits (tau {tau:.3f})", unit="edit", disable=None)
        for j, f in enumerate(bar):
            failure = explicit_failure(f.question, base_gens[instr[j]].text, correct_answer=f.answer,
                                       rule=f.rule)
            t0 = time.perf_counter()
            err = None
            try:
                r = apply_edit(failure, base=base, fusion=fusion, encoder=encoder, store=store,
                               keystore=keystore, ledger=ledger, cfg=cfg, locality_prompts=probes.verify,
                               locality_before=verify_before, exclude=f.held_out, verify=verify,
                               seed=seed * 100_000 + j)
            except Exception as e:          # an edit that fails is a data point, not the end of the run
                log.exception("edit of fact %d failed", j)
                r, err = None, f"{type(e).__name__}: {e}"
            secs = time.perf_counter() - t0
            rec: dict[str, Any] = {"fact": j, "seconds": secs, "error": err, "loadavg_1m": _load1()}
            if r is not None:
                if r.status in ("verified", "committed"):
                    fact_expert[j] = r.expert_id
                rec.update(status=r.status, expert_id=r.expert_id, created=r.created, steps=r.steps,
                           lm_loss_first=r.lm_losses[0], lm_loss_last=r.lm_losses[-1],
                           router_loss_first=r.router_losses[0], router_loss_last=r.router_losses[-1],
                           reason=r.reason, timings={k: round(v, 3) for k, v in r.timings.items()})
            else:
                rec["status"] = "error"
            edits.append(rec)
            bar.set_postfix(status=rec["status"], s=f"{secs:.1f}")
        bar.close()
        edit_secs = [e["seconds"] for e in edits if e["status"] != "error"]

        # 5. after all edits: routed generation, then the rule variants --------------------------------
        t0 = time.perf_counter()
        fetch = make_fetch(store)
        router = make_router(keystore, cfg.keystore.k, cfg.keystore.tau, search_slack(encoder))   # as served
        sr_gens = _generate_all(base, fusion, encoder, chats, params=params, router_for=lambda rows: router,
                                fetch=fetch, batch_size=batch_size, desc="SR-TTT")
        top1 = [g.expert_ids[0] if g.expert_ids else None for g in sr_gens]
        sr_eval_s = time.perf_counter() - t0
        rss_sr = peak_rss_mb()

        variants: dict[str, list[Any]] = {"sr_ttt": sr_gens, "baseline_base": base_gens}
        rule_of = {rec.expert_id: rec.rule for rec in ledger.list(("committed", "verified"))}
        if with_rule_option:
            routed = [i for i, e in enumerate(top1) if e is not None and e in rule_of]
            rule_chats = [with_rule(chats[i], rule_of[top1[i]]) for i in routed]
            t0 = time.perf_counter()
            ric = _generate_all(base, None, None, rule_chats, params=params, router_for=None, fetch=None,
                                batch_size=batch_size, desc="rule in context")
            ric_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            comb = _generate_all(
                base, fusion, encoder, rule_chats, params=params, fetch=fetch, batch_size=batch_size,
                router_for=lambda rows: _fixed_router([sr_gens[routed[r]].expert_ids for r in rows],
                                                      [sr_gens[routed[r]].scores for r in rows],
                                                      cfg.keystore.k),
                desc="combined")
            comb_s = time.perf_counter() - t0
            for name, got in (("baseline_rule_in_context", ric), ("combined", comb)):
                full = list(base_gens)                     # no route -> no rule: the base model's output
                for r_i, i in enumerate(routed):
                    full[i] = got[r_i]
                variants[name] = full
        rss_end = peak_rss_mb()

        # metrics ---------------------------------------------------------------------------------------
        results: dict[str, dict[str, Any]] = {}
        for name, gens in variants.items():
            routing = None if name == "baseline_base" else top1
            m = _variant_metrics(prompts, facts, gens, base_gens, routing, fact_expert)
            m["edit_seconds_p50"] = _p50(edit_secs) if name in ("sr_ttt", "combined") else None
            m["peak_rss_mb"] = {"baseline_base": rss_base, "sr_ttt": rss_sr}.get(name, rss_end)
            results[name] = m
        if with_rule_option:
            results["baseline_rule_in_context"]["note"] = (
                "routing (and so the rule found) comes from the SR-TTT edits' keys; no expert weights used")

        steps = [e["steps"] for e in edits if "steps" in e]
        # "quiet" edits: 1-minute load at most cores + 1 (this process alone accounts for about the cores)
        ncpu = os.cpu_count() or 1
        quiet = [e["seconds"] for e in edits
                 if e["status"] != "error" and e["loadavg_1m"] is not None and e["loadavg_1m"] <= ncpu + 1]
        train_s = [e["timings"].get("train_s") for e in edits if "timings" in e]
        doc: dict[str, Any] = {
            "benchmark": "ttt",
            "n_edits": n_edits,
            **{k: results["sr_ttt"][k] for k in METRICS},
            "baseline_base": results["baseline_base"],
            "baseline_rule_in_context": results.get("baseline_rule_in_context"),
            "combined": results.get("combined"),
            "sr_ttt": results["sr_ttt"],
            "targets": TARGETS,
            "edits_summary": {
                "verified": sum(e["status"] == "verified" for e in edits),
                "committed_unverified": sum(e["status"] == "committed" for e in edits),
                "rolled_back": sum(e["status"] == "rolled_back" for e in edits),
                "errors": sum(e["status"] == "error" for e in edits),
                "edit_seconds_p50": _p50(edit_secs), "edit_seconds_p90": (
                    float(np.percentile(edit_secs, 90)) if edit_secs else None),
                "edit_seconds_min": min(edit_secs) if edit_secs else None,
                "edit_seconds_max": max(edit_secs) if edit_secs else None,
                "edit_seconds_p50_quiet": _p50(quiet), "n_quiet_edits": len(quiet),
                "train_seconds_p50": _p50([s for s in train_s if s is not None]),
                "steps_p50": _p50(steps), "steps_max": max(steps) if steps else None,
                "seconds_per_step_p50": _p50([t / s for t, s in zip(train_s, steps) if t and s]),
                "base_already_right": int(sum(base_known)),
            },
            "tau": float(tau),
            "tau_calibration": tau_info,
            "timings_s": {"setup": setup_s, "base_eval": base_eval_s, "edits": float(sum(edit_secs)),
                          "sr_ttt_eval": sr_eval_s,
                          **({"rule_eval": ric_s, "combined_eval": comb_s} if with_rule_option else {}),
                          "total": time.perf_counter() - t_run},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {**machine, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
            "config": {
                "model": getattr(base, "name", "?"), "seed": seed, "with_rule_option": with_rule_option,
                "n_probes": len(probes.locality), "n_near_miss": probes.n_near_miss,
                "n_verify_probes": len(probes.verify), "n_calibration_negatives": len(probes.calibration),
                "n_calibration_facts": len(cal_facts), "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "verify": verify,
                "judge": "answer string contained, case-insensitive",
                "srmoa": cfg.to_dict(),
            },
            "edits": edits,
            "facts": [f.to_dict() for f in facts],
            "outputs": _outputs(prompts, facts, variants, top1),
        }
        out.write_text(json.dumps(doc, indent=1, default=_json_default))
    finally:
        for closer in (store, keystore):
            if closer is not None:
                closer.close()
        if fusion is not None:
            fusion.remove()                 # the base model is the plain model again
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if say is not None:
        say(format_summary(doc))
    return doc


def _outputs(prompts: Sequence[_Prompt], facts: Sequence[Fact], variants: dict[str, list[Any]],
             top1: Sequence[int | None]) -> list[dict[str, Any]]:
    """Per prompt: its text, the fact, the routing and each variant's reply (for inspection)."""
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"kind": p.kind, "structure": p.structure, "fact": p.fact,
                     "prompt": p.chat[-1]["content"], "routed_to": top1[i],
                     **{name: gens[i].text for name, gens in variants.items()}})
    return rows


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def format_summary(doc: dict[str, Any]) -> str:
    """A plain-text table of every variant's metrics (and the targets) from a result document."""
    cols = [("SR-TTT", doc.get("sr_ttt")), ("base", doc.get("baseline_base")),
            ("rule in ctx", doc.get("baseline_rule_in_context")), ("combined", doc.get("combined"))]
    cols = [(n, c) for n, c in cols if c]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) and abs(v) <= 1 else f"{v:.1f}"

    rows = ["reliability", "generalization", "locality", "routing_precision", "probe_false_route_rate",
            "edit_seconds_p50", "peak_rss_mb"]
    w = max(len(r) for r in rows) + 2
    es = doc["edits_summary"]
    lines = [f"SR-TTT benchmark: {doc['n_edits']} edits, tau {doc['tau']:.3f}, "
             f"{es['verified']} verified / {es['rolled_back']} rolled back / {es['errors']} errors",
             "".ljust(w) + "".join(n.rjust(13) for n, _ in cols) + "   target"]
    for r in rows:
        t = TARGETS.get(r)
        tgt = "" if t is None else (f"<= {t:g}" if r == "edit_seconds_p50" else f">= {t:g}")
        lines.append(r.ljust(w) + "".join(cell(c.get(r)).rjust(13) for _, c in cols) + f"   {tgt}")
    return "\n".join(lines)


__all__ = ["contains_answer", "format_summary", "run_ttt_bench", "with_rule"]
