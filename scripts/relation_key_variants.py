"""Offline probe of relation-key variants for the relation gate (`routing/relation_gate.py`) on SmolLM2.

The setup of `scripts/relation_margin_sweep.py --edited`: the benchmark's invented entities (3 facts
each), an expert's relation key = its failing question's key, every other edit's key in the bank. For
a variant of the subject's placeholder and of the pooling, it prints, against the deferral margin, the
share of held-out paraphrases the gate keeps with their own fact's expert (`para kept right`) and the
share of unedited questions it keeps with one of the entity's experts (`uned kept`, the leak's bound),
then the commonest misses at `--margin`. The variant replaces the gate module's `mask_subject` and
`_pool_prompts` for this process only; the default variant is the gate as shipped.

usage: python scripts/relation_key_variants.py [--placeholder it] [--keep-possessive]
         [--pool mean|last|meanlast|noph] [--layer 12] [--entities 167] [--margin -0.1] [--out FILE.json]
`noph`: the mean over the user's tokens but the placeholder's; `last`: the last user token's state;
`meanlast`: both, concatenated. Results of session 20-21: results/lifelong_gate/relation_key_variants.json.
"""
import argparse
import collections
import dataclasses
import json
import re
import sys
from pathlib import Path

here = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(here))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from srmoa_dist.bench.entity_facts import make_entity_facts  # noqa: E402
from srmoa_dist.bench.model_cache import shared_model_cache  # noqa: E402
from srmoa_dist.config import ModelConfig  # noqa: E402
from srmoa_dist.model.generation import encode_messages, prefill_lower  # noqa: E402
from srmoa_dist.model.loading import load_base_model  # noqa: E402
from srmoa_dist.routing import relation_gate  # noqa: E402
from srmoa_dist.routing.relation_bank import EditedRelations  # noqa: E402

MARGINS = (-0.2, -0.15, -0.1, -0.05, 0.0, 0.05)


def masker(placeholder: str, keep_possessive: bool):
    def mask_subject(text: str, subject: str, _placeholder: str | None = None) -> str:
        pattern = re.escape(subject) + ("" if keep_possessive else r"(?:'s)?")
        return re.sub(pattern, placeholder, text, flags=re.IGNORECASE)
    return mask_subject


def pooler(pool: str, placeholder: str):
    def pool_prompts(base, prompts, batch_size, *, last_layer=None) -> np.ndarray:
        tok = base.tokenizer
        ph_ids = set(tok.encode(" " + placeholder, add_special_tokens=False)) | set(
            tok.encode(placeholder, add_special_tokens=False))
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                chats = [[{"role": "user", "content": p}] for p in prompts[i:i + batch_size]]
                b = encode_messages(base, chats)
                h = prefill_lower(base, b.input_ids, b.attention_mask, last_layer=last_layer).hidden
                h = h.float()                                                       # (B, T, D)
                m = b.user_mask.float()                                             # (B, T)
                if pool == "noph":
                    ids = b.input_ids.tolist()
                    m = m * torch.tensor([[t not in ph_ids for t in row] for row in ids]).float()
                mean = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)           # (B, D)
                last_i = (b.user_mask * torch.arange(b.user_mask.shape[1])).argmax(1)   # (B,)
                last = h[torch.arange(h.shape[0]), last_i]                          # (B, D)
                v = {"mean": mean, "noph": mean, "last": last, "meanlast": torch.cat([mean, last], 1)}[pool]
                out.append(v.cpu().numpy())
        return np.concatenate(out)
    return pool_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--placeholder", default=relation_gate.PLACEHOLDER)
    ap.add_argument("--keep-possessive", action="store_true", help="mask \"X's\" as \"<placeholder>'s\"")
    ap.add_argument("--pool", default="mean", choices=("mean", "last", "meanlast", "noph"))
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--entities", type=int, default=167)
    ap.add_argument("--margin", type=float, default=-0.1)
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = ap.parse_args()
    mask = masker(a.placeholder, a.keep_possessive)
    relation_gate.mask_subject = mask
    if a.pool != "mean" or a.placeholder != relation_gate.PLACEHOLDER:
        relation_gate._pool_prompts = pooler(a.pool, a.placeholder)
    base = load_base_model(ModelConfig(), shared_model_cache())
    gate = relation_gate.RelationGate.fit(base, a.layer, defer_margin=a.margin)
    ents, F = make_entity_facts(a.entities, 3, 0), 3
    keys = [gate.encode(base, [f.question for f in e.facts], [e.name] * F) for e in ents]   # (F, D) each
    gate = dataclasses.replace(gate, edited=EditedRelations.of(
        {F * x + i: K[i] for x, K in enumerate(keys) for i in range(F)}))
    paras, uned = [], []
    for x, (e, K) in enumerate(zip(ents, keys)):
        asked = [(i, p) for i, f in enumerate(e.facts) for p in f.held_out]
        texts = [p for _, p in asked] + [e.unedited]
        r = gate.encode(base, texts, [e.name] * len(texts))                 # (P+1, D)
        s = r @ K.T                                                         # (P+1, F)
        j = s.argmax(1)
        for n, t in enumerate(texts):
            gap = float(s[n, j[n]] - gate.other_relations_best(r[n], K[j[n]:j[n] + 1], F * x + int(j[n])))
            row = {"text": mask(t, e.name), "picked": e.facts[j[n]].relation, "gap": gap}
            if n < len(asked):
                i = asked[n][0]
                paras.append({**row, "own": e.facts[i].relation, "picks_own": int(j[n]) == i})
            else:
                uned.append(row)
    rows = [{"margin": m,
             "paraphrase_kept_right": float(np.mean([p["picks_own"] and p["gap"] > m for p in paras])),
             "unedited_kept": float(np.mean([u["gap"] > m for u in uned]))} for m in MARGINS]
    print(f"placeholder {a.placeholder!r}{' (possessive kept)' if a.keep_possessive else ''}, pool {a.pool}, "
          f"layer {a.layer}: {len(paras)} paraphrases, {len(uned)} unedited questions")
    for r in rows:
        print(f"  margin {r['margin']:+.2f}: para kept right {r['paraphrase_kept_right']:.3f}  "
              f"uned kept {r['unedited_kept']:.3f}")
    misses = collections.Counter((p["own"], p["text"], p["picked"]) for p in paras
                                 if not (p["picks_own"] and p["gap"] > a.margin))
    kept = collections.Counter((u["text"], u["picked"]) for u in uned if u["gap"] > a.margin)
    for k, v in misses.most_common(5):
        print(f"  paraphrase missed {v}x: {k}")
    for k, v in kept.most_common(5):
        print(f"  unedited kept {v}x: {k}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"variant": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
