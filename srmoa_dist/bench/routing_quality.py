"""`srmoa bench routing`: how routing quality changes as one key space grows (1K -> 1M keys).

Real queries: the store's query encoder over layer-Lq states of generated questions
(`bench.question_bank`: n_facts invented facts, each asked by a key question and a held-out paraphrase,
2 * n_facts distinct questions) and of unrelated prompts (generic prompts and near-misses about real
entities). Pooled states are cached as .npy under the cache directory (keyed by the model's lower
layers and the prompt list), so later runs and other sizes reuse them.

Keys at size N: the first min(N, n_facts) facts' keys (the query of the key question, as a fresh
edit's key starts), and past n_facts synthetic keys drawn from the real query distribution: a real
key of a fact outside the evaluated set plus Gaussian noise (`SYNTH_NOISE`), renormalised. The first
`n_eval` facts are in every key set; their held-out paraphrases are the positives. Search is exact
(FAISS inner product), so the figures are the key space's own, not an approximate index's.

Per size: `own_top1` (a held-out paraphrase's best key is its own fact's), `routed_own` (that, and its
score passes tau: the edit serves it), `own_in_topk`, and `false_route` (an unrelated prompt's best
score passes tau). tau is calibrated once, at the smallest size, as the store does
(`query_encoder.calibrate_tau` on a calibration half of the unrelated prompts and facts, rate
`model.false_route_rate`), then held; beside it, the tau re-calibrated at each size and `routed_own`
there. JSON plus a PNG beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from srmoa_dist.bench.question_bank import make_question_bank, unrelated_prompts

log = logging.getLogger(__name__)

SYNTH_NOISE = 0.5          # std of the noise per unit-key norm (cos to the base key ~0.9)
TOP_K = 8


def _pool_cache_path(base: Any, prompts: Sequence[str], cache_dir: Path) -> Path:
    from srmoa_dist.routing.encoder_cache import fit_key

    h = hashlib.sha256(fit_key(base, 0).encode())
    h.update("\n".join(prompts).encode())
    return cache_dir / f"pooled-{h.hexdigest()[:24]}-{len(prompts)}.npy"


def pooled_cached(base: Any, prompts: Sequence[str], cache_dir: str | os.PathLike, *, progress: bool = True,
                  desc: str = "encoding prompts") -> np.ndarray:
    """`prompt_pool.pooled_prompts` through cache_dir/pooled-<hash>-<n>.npy (written atomically)."""
    from srmoa_dist.routing.prompt_pool import pooled_prompts

    cache_dir = Path(cache_dir)
    path = _pool_cache_path(base, prompts, cache_dir)
    if path.is_file():
        x = np.load(path)
        if x.shape == (len(prompts), base.d_model):
            log.info("pooled states from the cache %s", path)
            return x
    x = pooled_prompts(base, prompts, progress=progress, desc=desc)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, x)
    os.replace(tmp, path)
    return x


def synthetic_keys(real: np.ndarray, n: int, seed: int, noise: float = SYNTH_NOISE) -> np.ndarray:
    """n unit keys (n, d): random rows of `real` plus N(0, noise^2 / d) per dimension, renormalised."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        eps = rng.standard_normal((m, d), dtype=np.float32) * np.float32(noise / np.sqrt(d))
        k = real[rng.integers(0, real.shape[0], m)] + eps
        out[s : s + m] = k / np.linalg.norm(k, axis=1, keepdims=True)
    return out


def _search(keys: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(keys)
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), min(k, keys.shape[0]))


def evaluate_size(keys: np.ndarray, held: np.ndarray, own: np.ndarray, unrelated: np.ndarray, tau: float,
                  k: int = TOP_K) -> dict[str, Any]:
    """Figures of one key set: held (n, d) paraphrase queries whose own key id is own (n,)."""
    t0 = time.perf_counter()
    D, I = _search(keys, np.concatenate([held, unrelated]), k)
    dt = time.perf_counter() - t0
    n = held.shape[0]
    top1, s1 = I[:n, 0], D[:n, 0]
    hit = top1 == own
    in_k = (I[:n] == own[:, None]).any(1)
    un_best = D[n:, 0]
    mean = lambda x: float(x.mean()) if x.size else None     # noqa: E731
    return {"experts": int(keys.shape[0]), "own_top1": mean(hit),
            "routed_own": mean(hit & (s1 >= tau)), "own_in_topk": mean(in_k),
            "false_route": mean(un_best >= tau),
            "own_score_p50": float(np.median(D[:n][I[:n] == own[:, None]])) if in_k.any() else None,
            "unrelated_best_p50": float(np.median(un_best)) if un_best.size else None,
            "unrelated_best_p99": float(np.percentile(un_best, 99)) if un_best.size else None,
            "exact_search_ms_per_query": 1e3 * dt / max(len(D), 1),
            "keys_mb": keys.nbytes / 2**20, "_best_pos": s1, "_hit": hit, "_unrelated_best": un_best}


def run_routing_bench(out: Path, *, sizes: Sequence[int] = (1000, 10_000, 100_000, 1_000_000),
                      n_facts: int = 25_000, base: Any = None, model: str = "smollm2", d_key: int = 128,
                      false_route_rate: float = 0.01, n_unrelated: int | None = None,
                      cache_dir: Path | None = None, seed: int = 0,
                      say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); writes JSON to `out` (and a PNG beside)."""
    from srmoa_dist.bench.model_cache import shared_model_cache
    from srmoa_dist.routing.encoder_cache import calibrated
    from srmoa_dist.routing.query_encoder import calibrate_tau

    sizes = sorted(int(s) for s in sizes)
    if not sizes or sizes[0] < 4:
        raise ValueError(f"sizes must be integers >= 4, got {sizes}")
    if n_facts < 4:
        raise ValueError(f"n_facts must be >= 4, got {n_facts}")
    t_start = time.perf_counter()
    cache_dir = Path(cache_dir) if cache_dir is not None else shared_model_cache() / "routing_bench"
    if base is None:
        from srmoa_dist.config import ModelConfig
        from srmoa_dist.model.loading import load_base_model

        say(f"loading the base model {model} ...")
        base = load_base_model(ModelConfig(name_or_path=model), shared_model_cache())
    enc = calibrated(base, d_key, cache_dir / "encoders")
    bank = make_question_bank(n_facts, seed)
    unrel = unrelated_prompts(seed)[:n_unrelated]
    prompts = [f.key for f in bank] + [f.held_out for f in bank]
    say(f"{len(prompts)} distinct questions + {len(unrel)} unrelated prompts -> pooled layer-"
        f"{base.query_layer} states (cached in {cache_dir})")
    t0 = time.perf_counter()
    pooled = pooled_cached(base, prompts + unrel, cache_dir, desc="questions")
    encode_s = time.perf_counter() - t0
    q = enc.encode_pooled(pooled)                                           # (2F + U, d_key) unit
    fact_keys, held = q[:n_facts], q[n_facts : 2 * n_facts]
    un = q[2 * n_facts :]
    un_cal, un_eval = un[: len(un) // 2], un[len(un) // 2 :]
    n_eval = min(sizes[0] // 2, n_facts // 2)            # evaluated facts: in every key set
    n_cal = min(sizes[0], n_facts) - n_eval              # calibration facts: the rest of the smallest set
    own = np.arange(n_eval)
    synth_needed = max(0, sizes[-1] - n_facts)
    synth = synthetic_keys(fact_keys[n_eval:], synth_needed, seed + 1) if synth_needed else None

    def keys_of(n: int) -> np.ndarray:
        real = fact_keys[: min(n, n_facts)]
        return real if n <= n_facts else np.concatenate([real, synth[: n - n_facts]])

    # tau: calibrated at the smallest size on the calibration halves, then held
    k0 = keys_of(sizes[0])
    cal = evaluate_size(k0, held[n_eval : n_eval + n_cal], np.arange(n_eval, n_eval + n_cal), un_cal, 1.0)
    pos = cal["_best_pos"][cal["_hit"]]
    tau = calibrate_tau(pos, cal["_unrelated_best"], false_route_rate)
    say(f"tau {tau:.4f} (calibrated at {sizes[0]} keys on {n_cal} facts and {len(un_cal)} unrelated prompts, "
        f"false-route rate {false_route_rate})")
    rows = []
    for n in sizes:
        keys = keys_of(n)
        r = evaluate_size(keys, held[:n_eval], own, un_eval, tau)
        c = evaluate_size(keys, held[:0], own[:0], un_cal, 1.0)
        tau_n = calibrate_tau([], c["_unrelated_best"], false_route_rate)
        r["tau_recalibrated"] = tau_n
        r["routed_own_at_recalibrated_tau"] = float((r["_hit"] & (r["_best_pos"] >= tau_n)).mean())
        r["false_route_at_recalibrated_tau"] = float((r["_unrelated_best"] >= tau_n).mean())
        r["synthetic_keys"] = max(0, n - n_facts)
        for k in [k for k in r if k.startswith("_")]:
            r.pop(k)
        rows.append(r)
        say(f"{n:>9} keys: own top-1 {r['own_top1']:.3f}, routed to own {r['routed_own']:.3f}, false route "
            f"{r['false_route']:.3f} at tau {tau:.3f}; re-calibrated tau {tau_n:.3f} -> routed "
            f"{r['routed_own_at_recalibrated_tau']:.3f}")
    first = rows[0]
    ok = [r["experts"] for r in rows
          if r["routed_own"] >= first["routed_own"] - 0.05 and r["false_route"] <= 2 * max(false_route_rate,
                                                                                          first["false_route"])]
    doc = {
        "benchmark": "routing", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": base.name, "query_layer": base.query_layer, "d_key": enc.d_key,
        "n_facts": n_facts, "distinct_questions": len(prompts), "unrelated_prompts": len(unrel),
        "n_eval_facts": n_eval, "n_calibration_facts": n_cal, "synthetic_noise": SYNTH_NOISE, "top_k": TOP_K,
        "tau": tau, "false_route_rate_target": false_route_rate, "encode_s": encode_s,
        "sizes": rows,
        "largest_size_within_5pt_and_2x_false_route": max(ok) if ok else None,
        "seconds_total": time.perf_counter() - t_start,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    plot_routing(doc, out.with_suffix(".png"))
    return doc


def plot_routing(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["experts"] for r in doc["sizes"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("routed_own", f"held-out routed to own expert (tau {doc['tau']:.2f})"),
                       ("own_top1", "own expert top-1 (no tau)"),
                       ("routed_own_at_recalibrated_tau", "routed to own, tau re-calibrated per size"),
                       ("false_route", "unrelated prompts false-routed (tau held)")):
        ax.plot(n, [r[key] for r in doc["sizes"]], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("keys in one key space")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Routing quality vs key count ({doc['model']}, {doc['distinct_questions']} questions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["run_routing_bench", "pooled_cached", "synthetic_keys", "evaluate_size", "SYNTH_NOISE"]
