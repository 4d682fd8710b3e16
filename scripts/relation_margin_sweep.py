"""Offline sweep of the relation gate's deferral margin (`model.relation_defer_margin`) on SmolLM2.

No edit is trained: an expert's relation key is the key of its fact's failing question, as an edit gives
it. For each invented entity of `bench.entity_facts` (its first F facts edited), a held-out paraphrase
of an edited fact is *kept right* when the gate would keep the expert it picks and that expert is its
own fact's; the entity's unedited question is *kept* (a leak risk) when the gate would keep any of the
entity's experts. Both against the margin, as `RelationGate.arbitrate` decides (`other_relations_best`).
With the subject masked, questions of one relation template read alike for every entity, so the
figures rest on the distinct masked texts (`distinct_*` in the JSON), not on the entity count.

`--edited`: the gate also holds every other entity's edited relation keys (`model.relation_bank_edits`,
`routing.relation_bank.EditedRelations`), as it would once all the entities' facts are edited; each
sweep is then run with and without them.

usage: python scripts/relation_margin_sweep.py [--entities 60] [--seed 0] [--layer 12] [--edited]
         [--facts 3,1] [--out results/lifelong_defer/margin_sweep.json]
Prints a table and writes the JSON and a PNG beside it.
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

here = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(here))

import numpy as np  # noqa: E402

from srmoa_dist.bench.entity_facts import make_entity_facts  # noqa: E402
from srmoa_dist.bench.model_cache import shared_model_cache  # noqa: E402
from srmoa_dist.config import ModelConfig  # noqa: E402
from srmoa_dist.model.loading import load_base_model  # noqa: E402
from srmoa_dist.routing.relation_bank import EditedRelations  # noqa: E402
from srmoa_dist.routing.relation_gate import RelationGate, mask_subject  # noqa: E402

MARGINS = [round(m, 2) for m in np.arange(-0.20, 0.151, 0.025)]


def sweep(gate: RelationGate, base, entities, n_facts: int, edited: bool = False) -> dict:
    """Per margin: the share of paraphrases kept and picking their own fact, of unedited kept. With
    `edited`, fact i of entity x is expert n_facts x + i; the gate also holds the other entities' keys."""
    para_gap, para_own, uned_gap = [], [], []
    para_texts, uned_texts = set(), set()
    keys = [gate.encode(base, [f.question for f in ent.facts[:n_facts]], [ent.name] * n_facts)
            for ent in entities]                                                          # (F, D) each
    if edited:
        gate = dataclasses.replace(gate, edited=EditedRelations.of(
            {n_facts * x + i: K[i] for x, K in enumerate(keys) for i in range(n_facts)}))
    for x, (ent, K) in enumerate(zip(entities, keys)):
        facts = ent.facts[:n_facts]
        paras = [(i, p) for i, f in enumerate(facts) for p in f.held_out]
        r = gate.encode(base, [p for _, p in paras] + [ent.unedited], [ent.name] * (len(paras) + 1))
        s = r @ K.T                                                                       # (P+1, F)
        j = s.argmax(axis=1)                                                              # (P+1,)
        bank_best = [gate.other_relations_best(r_n, K[j_n:j_n + 1], n_facts * x + int(j_n))
                     for r_n, j_n in zip(r, j)]
        para_texts |= {mask_subject(p, ent.name) for _, p in paras}
        uned_texts.add(mask_subject(ent.unedited, ent.name))
        for n, (i, _) in enumerate(paras):
            para_gap.append(float(s[n, j[n]] - bank_best[n]))
            para_own.append(int(j[n]) == i)
        uned_gap.append(float(s[-1, j[-1]] - bank_best[-1]))
    para_gap, para_own, uned_gap = np.array(para_gap), np.array(para_own), np.array(uned_gap)
    rows = [{"margin": m,
             "paraphrase_kept_right": float(((para_gap > m) & para_own).mean()),
             "paraphrase_kept": float((para_gap > m).mean()),
             "unedited_kept": float((uned_gap > m).mean())} for m in MARGINS]
    auc = float((para_gap[:, None] > uned_gap[None, :]).mean())
    return {"facts_per_entity": n_facts, "edited_bank": edited, "n_paraphrases": len(para_gap),
            "n_unedited": len(uned_gap),
            "distinct_paraphrases": len(para_texts), "distinct_unedited": len(uned_texts),
            "paraphrase_picks_own": float(para_own.mean()), "auc_paraphrase_vs_unedited": auc,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entities", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--edited", action="store_true", help="also sweep with other entities' edited keys")
    ap.add_argument("--facts", default="3,1", help="facts per entity of each sweep")
    ap.add_argument("--out", default=str(here / "results/lifelong_defer/margin_sweep.json"))
    a = ap.parse_args()
    base = load_base_model(ModelConfig(), shared_model_cache())
    gate = RelationGate.fit(base, a.layer)
    entities = make_entity_facts(a.entities, 3, a.seed)
    out = {"layer": a.layer, "seed": a.seed, "entities": a.entities, "bank_rows": int(gate.bank.shape[0]),
           "sweeps": [sweep(gate, base, entities, int(f), e) for f in a.facts.split(",")
                      for e in ((False, True) if a.edited else (False,))]}
    for sw in out["sweeps"]:
        print(f"{sw['facts_per_entity']} fact(s) an entity{', edited bank' if sw['edited_bank'] else ''}: "
              f"{sw['n_paraphrases']} paraphrases, "
              f"{sw['n_unedited']} unedited ({sw['distinct_paraphrases']} and {sw['distinct_unedited']} "
              f"distinct masked); picks own {sw['paraphrase_picks_own']:.3f}, "
              f"AUC {sw['auc_paraphrase_vs_unedited']:.3f}")
        print("  margin  para kept right  para kept  unedited kept")
        for r in sw["rows"]:
            print(f"  {r['margin']:+.3f}  {r['paraphrase_kept_right']:.3f}  {r['paraphrase_kept']:.3f}"
                  f"  {r['unedited_kept']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, sw in enumerate(out["sweeps"]):
        m, c = [r["margin"] for r in sw["rows"]], f"C{n}"
        what = f"{sw['facts_per_entity']} facts{', edited bank' if sw['edited_bank'] else ''}"
        ax.plot(m, [r["paraphrase_kept_right"] for r in sw["rows"]], c,
                label=f"paraphrase kept, right ({what})")
        ax.plot(m, [r["unedited_kept"] for r in sw["rows"]], c + "--", label=f"unedited kept ({what})")
    ax.set_xlabel("relation_defer_margin")
    ax.set_ylabel("share")
    ax.legend(fontsize=7)
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(os.path.splitext(a.out)[0] + ".png", dpi=110)


if __name__ == "__main__":
    main()
