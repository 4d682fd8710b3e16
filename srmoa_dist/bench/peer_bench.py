"""`srmoa bench peer`: the same adapters as PEFT LoRA in one `PeftModel` vs the routed fusion path.

Like for like, in one process and one run: `adapters` random LoRA experts of the `lora` form on the
same modules (`expert.target_modules`, default q_proj and v_proj, layers above the query layer), each
exported with `experts/peft_io.save_peft_adapter` and loaded into one `PeftModel` (a copy of the base
model) as a named adapter. A batch of B chats gives row b adapter b % adapters (mixed adapters in one
batch), and both paths decode exactly `new_tokens` tokens greedily with the same HF `generate` loop:

    peft     peft_model.generate(..., adapter_names=[...])      (PEFT's mixed-adapter batch)
    fusion   with fusion.routing([[e_b] for b], gates=1): model.generate(...)   (model/fusion.py)
    base     model.generate(...) with no adapter                (the floor both are measured against)

Before timing, the two paths are checked to compute the same model: the max |logit difference| of a
mixed batch's forward (reported) and the greedy tokens. Timings alternate path by path, `repeats`
times at each batch size (so the machine's background load hits all alike); the figures are medians:
tokens/s = B * new_tokens / seconds, and `fusion_vs_peft` = fusion tokens/s / peft tokens/s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from srmoa_dist.config import SrmoaConfig

log = logging.getLogger(__name__)

PROMPTS = ("Write a short poem about the sea.", "What is a good name for a cat?",
           "Explain why the sky is blue.", "List three fruits.", "Tell me a fact about Mars.",
           "How do bees make honey?", "Describe a quiet morning.", "What is 12 times 7?")
PATHS = ("peft", "fusion", "base")


class PeerRun:
    """One run: build both models, check they agree, time them side by side. Read `run` top down."""

    def __init__(self, cfg: SrmoaConfig, *, adapters: int = 8, batch_sizes: Sequence[int] = (1, 8),
                 new_tokens: int = 32, repeats: int = 3, b_std: float = 0.02,
                 say: Callable[[str], None] = print) -> None:
        if cfg.expert.form != "lora":
            raise ValueError(f"expert.form must be 'lora' for a like-for-like PEFT comparison, "
                             f"got {cfg.expert.form!r}")
        for name, v in (("adapters", adapters), ("new_tokens", new_tokens), ("repeats", repeats)):
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if not batch_sizes or any(b <= 0 for b in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
        self.cfg, self.say = cfg, say
        self.n_adapters, self.batch_sizes = int(adapters), [int(b) for b in batch_sizes]
        self.new_tokens, self.repeats, self.b_std = int(new_tokens), int(repeats), float(b_std)

    def run(self) -> dict[str, Any]:
        self._build()
        agreement = self._check_agreement()
        rows = [self._time(b) for b in self.batch_sizes]
        return self._report(agreement, rows)

    # -- build ------------------------------------------------------------------------------------------

    def _build(self) -> None:
        from peft import PeftModel

        from srmoa_dist.experts.expert import LoRAExpert
        from srmoa_dist.experts.peft_io import save_peft_adapter
        from srmoa_dist.model.fusion import ExpertFusion
        from srmoa_dist.model.loading import load_base_model

        cfg, e = self.cfg, self.cfg.expert
        self.say(f"loading {cfg.model.name_or_path} and {self.n_adapters} adapters ...")
        t0 = time.perf_counter()
        self.base = load_base_model(cfg.model, cfg.model_cache_dir)
        self.load_s = time.perf_counter() - t0
        peft_base = copy.deepcopy(self.base.model)          # PEFT rewrites the modules it wraps
        self.fusion = ExpertFusion(self.base.model, e, cfg.model.query_layer)
        shapes = self.fusion.target_shapes()
        self.experts = [LoRAExpert.random(shapes, e.rank, e.alpha, "float32", seed=i, b_std=self.b_std)
                        for i in range(self.n_adapters)]
        with tempfile.TemporaryDirectory(prefix="srmoa-peer-") as tmp:
            dirs = [save_peft_adapter(x, Path(tmp) / f"a{i}") for i, x in enumerate(self.experts)]
            pm = PeftModel.from_pretrained(peft_base, str(dirs[0]), adapter_name="a0")
            for i, d in enumerate(dirs[1:], start=1):
                pm.load_adapter(str(d), adapter_name=f"a{i}")
        self.peft = pm.eval()
        self.targets = len(shapes)

    def _batch(self, B: int) -> tuple[Any, Any, list[int]]:
        from srmoa_dist.model.generation import encode_messages

        chats = [[{"role": "user", "content": PROMPTS[b % len(PROMPTS)]}] for b in range(B)]
        batch = encode_messages(self.base, chats)
        return batch.input_ids, batch.attention_mask, [b % self.n_adapters for b in range(B)]

    # -- check ------------------------------------------------------------------------------------------

    def _check_agreement(self) -> dict[str, Any]:
        """Both paths on one mixed batch: max |logit diff| of a forward, and equal greedy tokens?"""
        import torch

        ids, mask, which = self._batch(min(8, max(self.batch_sizes)))
        with torch.no_grad():
            lp = self.peft(input_ids=ids, attention_mask=mask, adapter_names=[f"a{i}" for i in which]).logits
            with self.fusion.routing([[self.experts[i]] for i in which]):
                lf = self.base.model(input_ids=ids, attention_mask=mask).logits
            lb = self.base.model(input_ids=ids, attention_mask=mask).logits
        m = mask.bool()
        diff = float((lp - lf)[m].abs().max())
        effect = float((lf - lb)[m].abs().max())
        tp, tf = self._generate("peft", ids, mask, which), self._generate("fusion", ids, mask, which)
        out = {"max_abs_logit_diff": diff, "max_abs_adapter_effect": effect,
               "same_greedy_tokens": bool(torch.equal(tp, tf)), "batch": int(ids.shape[0])}
        self.say(f"agreement: max |logit diff| {diff:.2e} (adapter effect {effect:.2e}), "
                 f"same greedy tokens: {out['same_greedy_tokens']}")
        return out

    # -- time -------------------------------------------------------------------------------------------

    def _generate(self, path: str, ids: Any, mask: Any, which: list[int]) -> Any:
        import torch

        kw = {"max_new_tokens": self.new_tokens, "min_new_tokens": self.new_tokens, "do_sample": False,
              "pad_token_id": self.base.tokenizer.pad_token_id}
        with torch.no_grad():
            if path == "peft":
                out = self.peft.generate(input_ids=ids, attention_mask=mask,
                                         adapter_names=[f"a{i}" for i in which], **kw)
            elif path == "fusion":
                with self.fusion.routing([[self.experts[i]] for i in which]):
                    out = self.base.model.generate(input_ids=ids, attention_mask=mask, **kw)
            else:
                out = self.base.model.generate(input_ids=ids, attention_mask=mask, **kw)
        return out[:, ids.shape[1]:]

    def _time(self, B: int) -> dict[str, Any]:
        ids, mask, which = self._batch(B)
        for path in PATHS:                                # warm-up: first-call allocations
            self._generate(path, ids, mask, which)
        secs: dict[str, list[float]] = {p: [] for p in PATHS}
        for r in tqdm(range(self.repeats), desc=f"batch {B}", unit="round", leave=False, disable=None):
            order = PATHS[r % 3:] + PATHS[:r % 3]
            for path in order:
                t0 = time.perf_counter()
                toks = self._generate(path, ids, mask, which)
                secs[path].append(time.perf_counter() - t0)
                assert toks.shape == (B, self.new_tokens), toks.shape
        row: dict[str, Any] = {"batch": B, "adapters_in_batch": len(set(which)),
                               "new_tokens": self.new_tokens}
        for path in PATHS:
            s = statistics.median(secs[path])
            row[path] = {"median_s": s, "tokens_per_s": B * self.new_tokens / s, "runs_s": secs[path]}
        row["fusion_vs_peft"] = row["fusion"]["tokens_per_s"] / row["peft"]["tokens_per_s"]
        row["peft_vs_base"] = row["peft"]["tokens_per_s"] / row["base"]["tokens_per_s"]
        row["fusion_vs_base"] = row["fusion"]["tokens_per_s"] / row["base"]["tokens_per_s"]
        self.say(f"batch {B}: peft {row['peft']['tokens_per_s']:.1f} tok/s, fusion "
                 f"{row['fusion']['tokens_per_s']:.1f} tok/s, base {row['base']['tokens_per_s']:.1f} tok/s; "
                 f"fusion / peft = {row['fusion_vs_peft']:.2f}")
        return row

    # -- report -----------------------------------------------------------------------------------------

    def _report(self, agreement: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        import peft
        import torch

        e = self.cfg.expert
        return {
            "benchmark": "peer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "versions": {"peft": peft.__version__, "torch": torch.__version__},
            "model": self.cfg.model.name_or_path, "model_load_s": self.load_s,
            "adapter": {"form": e.form, "target_modules": list(e.target_modules), "rank": e.rank,
                        "alpha": e.alpha, "layers": [self.fusion.first_layer, self.fusion.last_layer],
                        "targets": self.targets},
            "adapters": self.n_adapters, "repeats": self.repeats, "agreement": agreement, "batches": rows,
            "fusion_vs_peft": {str(r["batch"]): r["fusion_vs_peft"] for r in rows},
        }


def run_peer_bench(out: Path, *, cfg: SrmoaConfig | None = None, model: str | None = None,
                   adapters: int = 8, batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 32,
                   repeats: int = 3, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); write the JSON to `out` and return it."""
    from srmoa_dist.bench.model_cache import link_shared_model_cache

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = cfg or SrmoaConfig()
    if model:
        cfg = cfg.replace(model=dataclasses.replace(cfg.model, name_or_path=model))
    cfg = cfg.replace(expert=dataclasses.replace(cfg.expert, form="lora"))
    with tempfile.TemporaryDirectory(prefix="srmoa-peer-store-") as tmp:
        cfg = cfg.replace(data_dir=tmp)
        link_shared_model_cache(tmp, cfg.model.name_or_path)
        doc = PeerRun(cfg, adapters=adapters, batch_sizes=batch_sizes, new_tokens=new_tokens, repeats=repeats,
                      say=say).run()
    out.write_text(json.dumps(doc, indent=1, default=_json_default))
    return doc


def _json_default(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else str(x)


__all__ = ["PeerRun", "run_peer_bench", "PATHS"]
