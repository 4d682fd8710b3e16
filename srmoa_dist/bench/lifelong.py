"""`srmoa bench lifelong`: many facts per entity, sequential edits, free generation at checkpoints.

One run, one process:

1. The base model, fusion, query encoder; on-disk stores (LMDB shards, KeyStore, ledger) under a fresh
   directory; tau calibrated as in `bench ttt` (proxy keys of other facts, generic and near-miss negatives).
2. `facts_per_entity` facts about each invented entity (`bench.entity_facts`), edited one after another
   entity by entity, each through `ttt.editor.Editor.run`: the code path of `POST /v1/feedback` (a
   request with the question, the base model's wrong answer and the correct answer; the rule is built
   from the exchange as the API does by default).
3. At each checkpoint (after 10, 100, 250, 500, 1000 edits, and the last), free greedy generation on the
   facts edited so far (at most `eval_facts` of them, an even sample):
       reliability     the failing question answered right (answer contained, case-insensitive)
       generalization  the 2 held-out paraphrases answered right (never trained on)
       locality        probes whose greedy tokens equal the base model's: generic prompts, near-misses
                       about real entities (`bench.facts.make_probes`) and questions of this
                       benchmark's relations about `n_strangers` invented entities no edit is about
                       (also on their own: `locality_invented`)
       leak            unedited questions about edited entities whose answer contains one of that
                       entity's edited answers (lower is better)
   for SR-TTT and, on the same facts, the baselines: `base` (the model alone), `rule_in_context` (the
   base model with the rule of the edit routing reaches, from the ledger, before the question: same
   routing as SR-TTT), `shared_lora` (one LoRA of the same geometry fine-tuned sequentially on every
   edit's 4 prompts at gate 1, no routing: what a user would do instead), `grace` (a GRACE-style codebook
   at one layer, its deferral radius calibrated to tau's false-route rate: `bench.grace`). SR-TTT's
   outputs seen at the previous checkpoint (the probes: the base model's) are confirmed in one
   teacher-forced forward (`model.greedy_check`) and only the others decoded; after the last edit the
   eval set is also decoded in full, side by side, and `greedy_check` says how many outputs agree and
   the seconds of each.
   For SR-TTT each checkpoint also says why its wrong held-out paraphrases were wrong
   (`held_out_misses`): no expert served them, other experts did, or their own fact's expert did and
   the answer was still wrong; and the same per relation (`by_relation`: the paraphrases of each edited
   relation, right or why not, and the unedited questions of each relation, leaked or not).
4. Consolidation: `serve_queries` mixed queries (held-out paraphrases, probes, unedited same-entity
   questions) are routed and their activations consolidated (gravity on, as serving records them; no
   decoding), then SR-TTT's metrics are measured again (`after_consolidation`).

Shapes: P prompts, k experts per query, d d_key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from srmoa_dist.bench.entity_facts import Entity, entities_and_strangers, make_entity_facts
from srmoa_dist.bench.facts import make_facts, make_probes
from srmoa_dist.bench.grace import GraceCodebook, calibrate_radius, default_layer
from srmoa_dist.bench.model_cache import shared_model_cache
from srmoa_dist.bench.ttt_bench import (
    _generate_all,
    _json_default,
    _machine,
    bench_store_config,
    calibrate_deferral,
    contains_any,
    peak_rss_mb,
    with_rule,
)
from srmoa_dist.config import SrmoaConfig
from srmoa_dist.model.greedy_check import expected_output

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]
CHECKPOINTS = (10, 100, 250, 500, 1000)
BASELINES = ("base", "rule_in_context", "shared_lora", "grace")
METRICS = ("reliability", "generalization", "locality", "leak")
TARGETS = {"reliability": 0.95, "generalization": 0.90, "locality": 0.99, "leak": 0.02,
           "edit_seconds_p50": 8.0, "edit_seconds_p90": 15.0}
SHARED_ID = 1 << 40                    # the shared LoRA's id in its own fixed router
CAL_AVOID_ENTITIES = 400              # calibration facts avoid the names of this many entities of the seed
GRACE_STEPS = 40                       # Adam steps on a GRACE value at most (it stops at ttt.converge_loss)


def _chat(text: str) -> Chat:
    return [{"role": "user", "content": text}]


@dataclasses.dataclass
class _EvalSet:
    """The prompts of one checkpoint: per row its kind, the fact or entity it belongs to."""

    chats: list[Chat]
    kinds: list[str]                    # trained | held_out | probe | unedited
    answers: list[tuple[str, ...]]      # trained/held_out: (answer,); unedited: the entity's answers
    facts: list[int | None] = dataclasses.field(default_factory=list)   # trained/held_out: the fact_id
    relations: list[str | None] = dataclasses.field(default_factory=list)   # trained/held_out/unedited

    def add(self, text: str, kind: str, answers: tuple[str, ...] = (), fact: int | None = None,
            relation: str | None = None) -> None:
        self.chats.append(_chat(text))
        self.kinds.append(kind)
        self.answers.append(answers)
        self.facts.append(fact)
        self.relations.append(relation)


def _eval_set(entities: Sequence[Entity], n_done: int, probes: Sequence[str], eval_facts: int,
              strangers: Sequence[str] = ()) -> _EvalSet:
    facts = [(e, f) for e in entities for f in e.facts][:n_done]
    if len(facts) > eval_facts:                                     # an even sample, the same every run
        pick = np.linspace(0, len(facts) - 1, eval_facts).round().astype(int)
        facts = [facts[i] for i in sorted(set(pick.tolist()))]
    es = _EvalSet([], [], [])
    for _, f in facts:
        es.add(f.question, "trained", (f.answer,), f.fact_id, f.relation)
        for h in f.held_out:
            es.add(h, "held_out", (f.answer,), f.fact_id, f.relation)
    seen = []
    for e, _ in facts:
        if e.name not in seen:
            seen.append(e.name)
            done = [f.answer for f in e.facts if f.fact_id < n_done]
            es.add(e.unedited, "unedited", tuple(done), relation=e.unedited_relation)
    for p in probes:
        es.add(p, "probe")
    for p in strangers:
        es.add(p, "stranger")
    return es


def _check_confirmation(gens_of: Callable[..., list[Any]], es: _EvalSet) -> dict[str, Any]:
    """The evaluation's shortcut checked: the final eval set decoded in full and, side by side, with the
    outputs seen at the last checkpoint confirmed in one forward (`model.greedy_check`); how many outputs
    agree token for token, and the seconds of each."""
    t = time.perf_counter()
    confirmed = gens_of(es.chats, "greedy check: confirmed")
    confirm_s = time.perf_counter() - t
    t = time.perf_counter()
    decoded = gens_of(es.chats, "greedy check: decoded", confirm=False)
    decode_s = time.perf_counter() - t
    same = sum(a.token_ids == b.token_ids for a, b in zip(confirmed, decoded))
    return {"rows": len(es.chats), "identical": same, "confirm_s": confirm_s, "decode_s": decode_s}


def _metrics(es: _EvalSet, gens: Sequence[Any], base_ids: dict[str, list[int]]) -> dict[str, Any]:
    got: dict[str, list[bool]] = {k: [] for k in ("trained", "held_out", "probe", "stranger", "unedited")}
    for chat, kind, ans, g in zip(es.chats, es.kinds, es.answers, gens):
        if kind in ("probe", "stranger"):
            got[kind].append(list(g.token_ids) == base_ids[chat[-1]["content"]])
        else:
            got[kind].append(contains_any(g.text, ans))
    mean = lambda xs: float(np.mean(xs)) if xs else None
    return {"reliability": mean(got["trained"]), "generalization": mean(got["held_out"]),
            "locality": mean(got["probe"] + got["stranger"]), "leak": mean(got["unedited"]),
            "locality_invented": mean(got["stranger"]),
            "n": {k: len(v) for k, v in got.items()}}


def miss_cause(g: Any, fact: int | None, expert_of: dict[int, int]) -> str:
    """Why a wrong held-out paraphrase was wrong, by its routing: no expert served it (`unrouted`: under
    tau, or deferred by the relation gate), experts served it but not the one its fact was trained into
    (`other_expert`), or its own fact's expert served it and the answer was still wrong (`own_expert`:
    the expert holds its fact for the trained wordings, not this one). `expert_of`: fact_id -> the
    expert its edit trained."""
    if not g.expert_ids:
        return "unrouted"
    return "own_expert" if expert_of.get(fact) in g.expert_ids else "other_expert"


def held_out_misses(es: _EvalSet, gens: Sequence[Any], expert_of: dict[int, int]) -> dict[str, int]:
    """The wrong held-out paraphrases counted by `miss_cause`."""
    out = {"unrouted": 0, "other_expert": 0, "own_expert": 0}
    for kind, ans, fact, g in zip(es.kinds, es.answers, es.facts, gens):
        if kind == "held_out" and not contains_any(g.text, ans):
            out[miss_cause(g, fact, expert_of)] += 1
    return out


def by_relation(es: _EvalSet, gens: Sequence[Any], expert_of: dict[int, int]) -> dict[str, dict[str, int]]:
    """Per relation: its held-out paraphrases (`held_out`), how many were answered right and why the
    others were not (`miss_cause`), and the unedited questions of that relation (`unedited`) with how
    many leaked one of their entity's edited answers (`leaked`). Relations in name order."""
    out: dict[str, dict[str, int]] = {}
    for kind, ans, fact, rel, g in zip(es.kinds, es.answers, es.facts, es.relations, gens):
        if kind not in ("held_out", "unedited") or rel is None:
            continue
        row = out.setdefault(rel, {"held_out": 0, "right": 0, "unrouted": 0, "other_expert": 0,
                                   "own_expert": 0, "unedited": 0, "leaked": 0})
        hit = contains_any(g.text, ans)
        if kind == "unedited":
            row["unedited"] += 1
            row["leaked"] += hit
        else:
            row["held_out"] += 1
            row["right" if hit else miss_cause(g, fact, expert_of)] += 1
    return dict(sorted(out.items()))


class SharedLoRA:
    """The user's fallback: one LoRA fine-tuned on every edit in turn, applied to every prompt at gate 1."""

    def __init__(self, base: Any, fusion: Any, encoder: Any, cfg: SrmoaConfig, seed: int = 0) -> None:
        from srmoa_dist.ttt.trainer import new_expert

        self.base, self.fusion, self.encoder, self.cfg = base, fusion, encoder, cfg
        self.te = fusion.trainable(new_expert(fusion.target_shapes(), cfg.expert, seed=seed))
        self.opt = torch.optim.AdamW(self.te.parameters(), lr=cfg.ttt.lr, weight_decay=0.0)
        self.steps = 0

    def train(self, prompts: Sequence[Any]) -> None:
        """Steps on one edit's prompts until the answer loss is under ttt.converge_loss (ttt.steps at
        most)."""
        from srmoa_dist.ttt.answer_loss import AnswerLoss, lm_batch, train_autocast, train_dtype

        batch = lm_batch(self.base.tokenizer, prompts, self.base.system_prompt, self.base.device)
        loss_fn = AnswerLoss(self.base, batch)
        params = list(self.te.parameters())
        dtype = train_dtype(self.cfg.ttt.train_dtype, self.base.device)          # as SR-TTT trains
        for _ in range(self.cfg.ttt.steps):
            with self.fusion.routing([[self.te]] * len(prompts)), train_autocast(dtype, self.base.device):
                loss = loss_fn()
            if float(loss.detach()) < self.cfg.ttt.converge_loss:
                break
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.cfg.ttt.grad_clip)
            self.opt.step()
            self.steps += 1

    def generate(self, chats: Sequence[Chat], params: Any, batch_size: int) -> list[Any]:
        expert = self.te.to_expert()

        def router_for(rows: list[int]):
            def router(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return np.ones((xq.shape[0], 1), np.float32), np.full((xq.shape[0], 1), SHARED_ID, np.int64)
            return router

        return _generate_all(self.base, self.fusion, self.encoder, chats, params=params,
                             router_for=router_for,
                             fetch=lambda ids: {SHARED_ID: expert}, batch_size=batch_size, desc="shared LoRA")


def run_lifelong_bench(
    n_edits: int,
    out: Path,
    *,
    facts_per_entity: int = 3,
    checkpoints: Sequence[int] = CHECKPOINTS,
    data_dir: Path | None = None,
    seed: int = 0,
    cfg: SrmoaConfig | None = None,
    base: Any = None,
    tau: float | None = None,
    baselines: Sequence[str] = ("base", "rule_in_context", "shared_lora"),   # of BASELINES
    eval_facts: int = 300,
    n_probes: int = 20,
    n_near_miss: int = 8,
    n_strangers: int = 8,
    serve_queries: int = 20_000,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    say: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write the JSON (and a PNG beside it); return it."""
    from srmoa_dist.experts.store import ShardedExpertStore
    from srmoa_dist.model.fusion import ExpertFusion
    from srmoa_dist.model.generation import GenerationParams
    from srmoa_dist.model.loading import load_base_model
    from srmoa_dist.routing.encoder_cache import calibrated
    from srmoa_dist.routing.keystore import KeyStore
    from srmoa_dist.routing.relation_gate import gated, search_slack, sync_edited
    from srmoa_dist.runtime.edit_context import LOCALITY_PROMPTS
    from srmoa_dist.ttt.detect import explicit_failure
    from srmoa_dist.ttt.diversify import diversify
    from srmoa_dist.ttt.edit_env import make_fetch, make_router
    from srmoa_dist.ttt.editor import Editor
    from srmoa_dist.ttt.ledger import EditLedger
    from srmoa_dist.ttt.reflect import reflect

    if n_edits <= 0:
        raise ValueError(f"n_edits must be positive, got {n_edits}")
    n_entities = -(-n_edits // facts_per_entity)
    entities, strangers = entities_and_strangers(n_entities, n_strangers, facts_per_entity, seed)
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"baselines: unknown {sorted(unknown)}; known: {', '.join(BASELINES)}")
    t_run = time.perf_counter()
    out = Path(out)
    tmp, cfg = bench_store_config("lifelong_bench", out, data_dir, cfg)
    machine = _machine()
    fusion = store = keystore = None
    try:
        if base is None:
            base = load_base_model(cfg.model, shared_model_cache())
        fusion = ExpertFusion(base.model, cfg.expert, query_layer=base.query_layer)
        encoder = gated(base, calibrated(base, cfg.keystore.d_key, shared_model_cache() / "encoders"),
                        shared_model_cache() / "encoders")
        facts = [(e, f) for e in entities for f in e.facts][:n_edits]
        probes = make_probes(seed, n_locality=n_probes, n_near_miss=n_near_miss)
        cal = calibration_facts(n_edits, n_entities + n_strangers, facts_per_entity, seed)
        if tau is None:
            tau, tau_info = calibrate_deferral(base, encoder, cal, probes.calibration,
                                               cfg.model.false_route_rate)
        else:
            tau_info = {"method": "given", "tau": float(tau)}
        cfg = cfg.replace(keystore=dataclasses.replace(cfg.keystore, tau=float(tau)))
        params = GenerationParams(max_new_tokens=max_new_tokens)

        base_cache: dict[str, Any] = {}

        def base_gens(chats: Sequence[Chat]) -> list[Any]:
            todo = [c for c in chats if c[-1]["content"] not in base_cache]
            for c, g in zip(todo, _generate_all(base, None, None, todo, params=params, router_for=None,
                                                fetch=None, batch_size=batch_size, desc="base model")):
                base_cache[c[-1]["content"]] = g
            return [base_cache[c[-1]["content"]] for c in chats]

        locality_prompts = [*probes.locality, *strangers]
        base_gens([_chat(p) for p in locality_prompts])
        base_ids = {p: list(base_cache[p].token_ids) for p in locality_prompts}

        store = ShardedExpertStore(cfg.shards_dir, cfg.store)
        keystore = KeyStore.open(cfg.keystore_dir, cfg.keystore, cfg.gravity)
        ledger = EditLedger(cfg.ledger_dir)
        editor = Editor(cfg, base=base, fusion=fusion, encoder=encoder, store=store, keystore=keystore,
                        ledger=ledger, locality_prompts=LOCALITY_PROMPTS[: cfg.ttt.locality_probes])
        shared = SharedLoRA(base, fusion, encoder, cfg, seed) if "shared_lora" in baselines else None
        grace, grace_info = None, None
        if "grace" in baselines:
            layer = default_layer(base)
            eps0, grace_info = calibrate_radius(base, layer, cal, probes.calibration,
                                                cfg.model.false_route_rate)
            grace = GraceCodebook(base, layer, eps0, steps=GRACE_STEPS, converge_loss=cfg.ttt.converge_loss)
        grace_seconds: list[float] = []
        router = make_router(keystore, cfg.keystore.k, cfg.keystore.tau, search_slack(encoder))   # as served
        fetch = make_fetch(store)

        seen: dict[str, list[int]] = {}       # SR-TTT's latest output of each eval prompt (what to confirm)

        def sr_ttt_gens(chats: Sequence[Chat], desc: str, confirm: bool = True) -> list[Any]:
            sync_edited(encoder, keystore, store)
            known = [seen.get(c[-1]["content"], base_ids.get(c[-1]["content"])) for c in chats]
            expected = [expected_output(k, max_new_tokens) if k is not None else None for k in known]
            gens = _generate_all(base, fusion, encoder, chats, params=params, router_for=lambda rows: router,
                                 fetch=fetch, batch_size=batch_size, desc=desc,
                                 expected=expected if confirm else None)
            seen.update((c[-1]["content"], list(g.token_ids)) for c, g in zip(chats, gens))
            return gens

        def evaluate(n_done: int, baselines: Sequence[str] = baselines) -> dict[str, dict[str, Any]]:
            es = _eval_set(entities, n_done, probes.locality, eval_facts, strangers)
            t = time.perf_counter()
            sr = sr_ttt_gens(es.chats, f"SR-TTT @ {n_done}")
            expert_of = {x["fact"]: x["expert_id"] for x in edits if x["status"] in ("verified", "committed")}
            res = {"sr_ttt": {"edits": n_done, **_metrics(es, sr, base_ids),
                              "routed_share": float(np.mean([bool(g.expert_ids) for g in sr])),
                              "held_out_misses": held_out_misses(es, sr, expert_of),
                              "by_relation": by_relation(es, sr, expert_of),
                              "eval_s": time.perf_counter() - t}}
            last_outputs[:] = [{"prompt": c[-1]["content"], "kind": k, "answers": list(a), "text": g.text,
                                "experts": list(g.expert_ids), "scores": [round(x, 3) for x in g.scores],
                                "gates": [round(x, 3) for x in g.gates]}
                               for c, k, a, g in zip(es.chats, es.kinds, es.answers, sr)]
            if "base" in baselines:
                res["base"] = {"edits": n_done, **_metrics(es, base_gens(es.chats), base_ids)}
            if "rule_in_context" in baselines:
                rule_of = {r.expert_id: r.rule for r in ledger.list(("committed", "verified"))}
                rows = [i for i, g in enumerate(sr) if g.expert_ids and g.expert_ids[0] in rule_of]
                ric = _generate_all(base, None, None, [with_rule(es.chats[i], rule_of[sr[i].expert_ids[0]])
                                                       for i in rows], params=params, router_for=None,
                                    fetch=None, batch_size=batch_size, desc="rule in context")
                full = base_gens(es.chats)
                for r_i, i in enumerate(rows):
                    full[i] = ric[r_i]
                res["rule_in_context"] = {"edits": n_done, **_metrics(es, full, base_ids)}
            if shared is not None and "shared_lora" in baselines:
                gens = shared.generate(es.chats, params, batch_size)
                res["shared_lora"] = {"edits": n_done, **_metrics(es, gens, base_ids)}
            if grace is not None and "grace" in baselines:
                gens = grace.generate(es.chats, params, batch_size)
                res["grace"] = {"edits": n_done, **_metrics(es, gens, base_ids)}
            return res

        last_outputs: list[dict[str, Any]] = []                  # SR-TTT's outputs at the latest evaluation
        marks = sorted({c for c in checkpoints if 0 < c < n_edits} | {n_edits})
        curves: dict[str, list[dict[str, Any]]] = {}
        edits: list[dict[str, Any]] = []
        bar = tqdm(facts, desc=f"lifelong edits (tau {tau:.3f})", unit="edit", disable=None)
        for j, (e, f) in enumerate(bar):
            wrong = base_gens([_chat(f.question)])[0].text
            request = {"prompt": f.question, "response": wrong, "correct_answer": f.answer}
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"fact": f.fact_id, "entity": e.name, "relation": f.relation}
            try:
                r = editor.run(request, exclude=f.held_out, seed=seed * 100_000 + j)
                rec.update(status=r.status, expert_id=r.expert_id, created=r.created, steps=r.steps,
                           neighbours=len(r.neighbours), neighbours_broken=len(r.neighbours_broken),
                           reason=r.reason, timings={k: round(v, 3) for k, v in r.timings.items()})
            except Exception as ex:           # a failed edit is a data point, not the end of the run
                log.exception("edit of fact %d failed", f.fact_id)
                rec.update(status="error", error=f"{type(ex).__name__}: {ex}")
            rec["seconds"] = time.perf_counter() - t0
            edits.append(rec)
            if shared is not None or grace is not None:       # the prompts SR-TTT trains on
                fail = explicit_failure(f.question, wrong, correct_answer=f.answer)
                prompts = diversify(fail, reflect(fail, None, cfg.ttt), exclude=f.held_out)
                if shared is not None:
                    shared.train(prompts)
                if grace is not None:
                    t1 = time.perf_counter()
                    grace.add(_chat(f.question), prompts, f.answer)
                    grace_seconds.append(time.perf_counter() - t1)
            bar.set_postfix(status=rec["status"], s=f"{rec['seconds']:.1f}")
            if j + 1 in marks:
                for name, m in evaluate(j + 1).items():
                    curves.setdefault(name, []).append(m)
                log.info("checkpoint %d: %s", j + 1, curves["sr_ttt"][-1])
                _write_partial(out, n_edits, facts_per_entity, float(tau), curves, edits)
        bar.close()
        check = _check_confirmation(sr_ttt_gens, _eval_set(entities, n_edits, probes.locality, eval_facts,
                                                                  strangers))

        # consolidation under mixed traffic, then every metric again
        t0 = time.perf_counter()
        cons = _consolidate_traffic(base, encoder, keystore, router, entities, n_edits, locality_prompts,
                                    serve_queries, cfg, seed)
        cons["seconds"] = time.perf_counter() - t0
        after = evaluate(n_edits, baselines=())          # the baselines do not route: consolidation is moot
        secs = [x["seconds"] for x in edits if x["status"] != "error"]
        pct = lambda q: float(np.percentile(secs, q)) if secs else None
        doc: dict[str, Any] = {
            "benchmark": "lifelong", "n_edits": n_edits, "facts_per_entity": facts_per_entity,
            "checkpoints": curves["sr_ttt"],
            "baselines": {k: v for k, v in curves.items() if k != "sr_ttt"},
            "after_consolidation": {"consolidation": cons, **after},
            "edit_seconds_p50": pct(50), "edit_seconds_p90": pct(90),
            "edits_summary": {s: sum(x["status"] == s for x in edits)
                              for s in ("verified", "committed", "rolled_back", "error")},
            "phase_seconds_p50": {k: float(np.median([x["timings"][k] for x in edits
                                                      if k in x.get("timings", {})]))
                                  for k in ("reflect_s", "train_s", "commit_s", "verify_s")
                                  if any(k in x.get("timings", {}) for x in edits)},
            "greedy_check": check,
            "grace": None if grace is None else {
                **grace.summary(), "calibration": grace_info,
                "edit_seconds_p50": float(np.median(grace_seconds)) if grace_seconds else None},
            "targets": TARGETS, "tau": float(tau), "tau_calibration": tau_info,
            "peak_rss_mb": peak_rss_mb(), "seconds_total": time.perf_counter() - t_run,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
            "config": {"model": getattr(base, "name", "?"), "seed": seed, "eval_facts": eval_facts,
                       "n_probes": len(probes.locality), "n_strangers": len(strangers),
                       "max_new_tokens": max_new_tokens,
                       "judge": "answer string contained, case-insensitive", "srmoa": cfg.to_dict()},
            "edits": edits,
            "outputs": last_outputs,
        }
        out.write_text(json.dumps(doc, indent=1, default=_json_default))
        _plot(doc, out.with_suffix(".png"))
    finally:
        for closer in (store, keystore):
            if closer is not None:
                closer.close()
        if fusion is not None:
            fusion.remove()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if say is not None:
        say(format_summary(doc))
    return doc


def _consolidate_traffic(base: Any, encoder: Any, keystore: Any, router: Any, entities: Sequence[Entity],
                         n_done: int, probes: Sequence[str], n_queries: int, cfg: SrmoaConfig,
                         seed: int, batch: int = 256) -> dict[str, Any]:
    """Route `n_queries` queries drawn from a mixed pool and consolidate their activations, as serving
    does."""
    from srmoa_dist.model.generation import GenerationParams, at_or_over_tau, queries, route
    from srmoa_dist.routing.gravity import Activations

    pool = [h for e in entities for f in e.facts if f.fact_id < n_done for h in f.held_out]
    pool += [e.unedited for e in entities if any(f.fact_id < n_done for f in e.facts)] + list(probes)
    if n_queries <= 0 or not pool:
        return {"queries": 0}
    Q = np.concatenate([queries(base, encoder, [_chat(p) for p in pool[i:i + 32]])
                        for i in range(0, len(pool), 32)])                            # (pool, d)
    rng = np.random.default_rng(seed)
    energy0 = keystore.energy()
    moved = 0
    gp = GenerationParams(gate_temperature=cfg.keystore.temperature)
    for s in tqdm(range(0, n_queries, batch), desc="consolidation traffic", unit="batch", leave=False,
                  disable=None):
        xq = Q[rng.integers(0, len(pool), min(batch, n_queries - s))]          # (b, d)
        r = at_or_over_tau(route(xq, router, gp))     # as serving records them
        k = max(1, max(len(i) for i in r.expert_ids))
        ids = np.full((len(xq), k), -1, np.int64)
        gates = np.zeros((len(xq), k), np.float32)
        for b, (ii, gg) in enumerate(zip(r.expert_ids, r.gates)):
            ids[b, :len(ii)], gates[b, :len(gg)] = ii, gg
        st = keystore.consolidate(Activations(xq, ids, gates))
        moved += st.n_moved
    return {"queries": n_queries, "pool": len(pool), "keys_moved": moved, "energy_before": energy0,
            "energy_after": keystore.energy(), "n_active": len(keystore)}


def calibration_facts(n_edits: int, n_entities: int, facts_per_entity: int, seed: int) -> list[Any]:
    """The held-apart facts tau (and GRACE's radius) are calibrated on: their names and answers are none
    of the first max(n_entities, CAL_AVOID_ENTITIES) entities' of the seed, so every run of up to that
    many entities (1,200 edits at 3 facts each) and at least 50 edits gets the same facts, so the same
    tau, whatever its size."""
    pool = make_entity_facts(max(n_entities, CAL_AVOID_ENTITIES), facts_per_entity, seed)
    avoid = [e.name for e in pool] + [f.answer for e in pool for f in e.facts]
    return make_facts(max(10, min(n_edits, 50)), seed + 100_003, avoid=avoid)


def _write_partial(out: Path, n_edits: int, facts_per_entity: int, tau: float,
                   curves: dict[str, list[dict[str, Any]]], edits: list[dict[str, Any]]) -> None:
    """Write the checkpoints reached so far to `out` (`"partial": true`): a long run stopped before its
    end keeps them. The finished run overwrites the file."""
    doc = {"benchmark": "lifelong", "partial": True, "n_edits": n_edits, "edits_done": len(edits),
           "facts_per_entity": facts_per_entity, "tau": tau, "checkpoints": curves["sr_ttt"],
           "baselines": {k: v for k, v in curves.items() if k != "sr_ttt"}, "edits": edits,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out.write_text(json.dumps(doc, indent=1, default=_json_default))


def format_summary(doc: dict[str, Any]) -> str:
    """A plain-text table: SR-TTT and each baseline at every checkpoint, then after consolidation."""
    lines = [f"lifelong benchmark: {doc['n_edits']} edits, {doc['facts_per_entity']} facts/entity, "
             f"tau {doc['tau']:.3f}, edit s p50 {doc['edit_seconds_p50']:.1f} / "
             f"p90 {doc['edit_seconds_p90']:.1f}, "
             f"{doc['edits_summary']}",
             f"{'variant':<16}{'edits':>6}" + "".join(f"{m:>16}" for m in METRICS)]
    rows = [("sr_ttt", c) for c in doc["checkpoints"]]
    rows += [(n, c) for n, cs in doc["baselines"].items() for c in cs]
    rows += [(f"{n} (after cons.)", c) for n, c in doc["after_consolidation"].items() if n != "consolidation"]
    for name, c in rows:
        cells = "".join("-".rjust(16) if c.get(m) is None else f"{c[m]:16.3f}" for m in METRICS)
        lines.append(f"{name:<16}{c['edits']:>6}{cells}")
    for c in doc["checkpoints"]:
        if "held_out_misses" in c:
            lines.append(f"wrong held-out paraphrases at {c['edits']} edits, by routing: "
                         + ", ".join(f"{k} {v}" for k, v in c["held_out_misses"].items()))
    last = doc["checkpoints"][-1] if doc["checkpoints"] else {}
    if last.get("by_relation"):
        lines.append(f"by relation at {last['edits']} edits (paraphrases right / asked, "
                     "unedited leaked / asked): "
                     + ", ".join(f"{r} {v['right']}/{v['held_out']} {v['leaked']}/{v['unedited']}"
                                 for r, v in last["by_relation"].items()))
    return "\n".join(lines)


def _plot(doc: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    series = {"sr_ttt": doc["checkpoints"], **doc["baselines"]}
    for ax, m in zip(axes, METRICS):
        for name, cs in series.items():
            xs = [c["edits"] for c in cs if c.get(m) is not None]
            ys = [c[m] for c in cs if c.get(m) is not None]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_title(m)
        ax.set_xlabel("edits")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["CHECKPOINTS", "SharedLoRA", "by_relation", "format_summary", "held_out_misses", "miss_cause",
           "run_lifelong_bench"]
