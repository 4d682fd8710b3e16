"""`srmoa bench partitions`: a simulation of the key store split into K partition actors (docs/scaling.md).

In one process, no Ray: N unit keys (d_key) are split over K partitions by expert id (id % K, the
placement a coordinator would use for capacity), each partition its own FAISS index of the kind the key
store would build for N / K keys (exact below `ivf_threshold`, else IVF with ~4 sqrt(n) lists, nprobe as
configured). A batch of queries is fanned out to every partition; each returns its top-k (scores, global
ids) and `merge_topk` keeps the best k of the K * k candidates. Per K: build seconds of the largest
partition (what a restarted partition pays), search ms per query of each partition (the fan-out's
latency on K parallel actors is the slowest partition plus the merge), the merge's cost, recall@k of
the merged answer against exact search over all N keys, and the keys' memory per partition.

With exact per-partition search the merged top-k *is* the global top-k (every global top-k key is in
its partition's top-k); with IVF partitions, recall can only rise with K (each partition probes nprobe of
fewer, smaller lists).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

IVF_THRESHOLD = 100_000


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-partition answers [(D (nq, k_p), I (nq, k_p)), ...] into the best k per query
    (scores descending; missing hits are id -1, score -inf)."""
    D = np.concatenate([p[0] for p in parts], axis=1)                       # (nq, sum k_p)
    I = np.concatenate([p[1] for p in parts], axis=1)
    D = np.where(I < 0, -np.inf, D)
    kk = min(k, D.shape[1])
    top = np.argpartition(-D, kk - 1, axis=1)[:, :kk]                       # (nq, kk) unordered
    Dt, It = np.take_along_axis(D, top, 1), np.take_along_axis(I, top, 1)
    order = np.argsort(-Dt, axis=1, kind="stable")
    return np.take_along_axis(Dt, order, 1), np.take_along_axis(It, order, 1)


def _index(keys: np.ndarray, ids: np.ndarray, nprobe: int, threshold: int) -> Any:
    import faiss

    d = keys.shape[1]
    n = keys.shape[0]
    if n < threshold:
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    else:
        nlist = max(16, int(4 * math.sqrt(n)))
        q = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFFlat(q, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        idx.train(keys[rng.choice(n, min(n, 64 * nlist), replace=False)])
        idx.nprobe = nprobe
    idx.add_with_ids(keys, ids)
    return idx


def simulate(keys: np.ndarray, queries: np.ndarray, ks: Sequence[int] = (1, 2, 4, 8), *, k: int = 8,
             nprobe: int = 16, ivf_threshold: int = IVF_THRESHOLD,
             say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Figures per partition count (see the module docstring)."""
    import faiss

    n = keys.shape[0]
    exact = faiss.IndexFlatIP(keys.shape[1])
    exact.add(keys)
    _, I_true = exact.search(queries, k)
    del exact
    ids = np.arange(n, dtype=np.int64)
    rows = []
    for K in ks:
        parts, build_s, search_s = [], [], []
        for p in range(K):
            sel = ids[ids % K == p]
            t = time.perf_counter()
            idx = _index(keys[sel], sel, nprobe, ivf_threshold)
            build_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            parts.append(idx.search(queries, k))
            search_s.append(time.perf_counter() - t)
            del idx
        t = time.perf_counter()
        D, I = merge_topk(parts, k)
        merge_s = time.perf_counter() - t
        pairs = zip(I.tolist(), I_true.tolist(), strict=True)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in pairs]))
        nq = queries.shape[0]
        row = {"partitions": K, "keys_per_partition": n // K,
               "index": "ivf" if n // K >= ivf_threshold else "exact",
               "build_s_max": max(build_s), "search_ms_per_query_max": 1e3 * max(search_s) / nq,
               "search_ms_per_query_sum": 1e3 * sum(search_s) / nq,
               "merge_ms_per_query": 1e3 * merge_s / nq,
               "fanout_ms_per_query": 1e3 * (max(search_s) + merge_s) / nq, "recall_at_k": recall,
               "keys_mb_per_partition": keys.nbytes / K / 2**20}
        rows.append(row)
        say(f"K={K}: {row['keys_per_partition']:,} keys/partition ({row['index']}), build "
            f"{row['build_s_max']:.1f} s, fan-out {row['fanout_ms_per_query']:.3f} ms/query, "
            f"recall@{k} {recall:.4f}")
    return rows


def run_partition_sim(out: Path, *, n: int = 1_000_000, ks: Sequence[int] = (1, 2, 4, 8),
                      n_queries: int = 2000, d: int = 128, nprobe: int = 16, seed: int = 0,
                      say: Callable[[str], None] = print) -> dict[str, Any]:
    """Clustered keys (a random unit centre per 1,000 keys plus noise, cos ~0.9 to it) and queries near
    random keys; `simulate` over them. Writes JSON."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 1000), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.5 / np.sqrt(d))
    keys = centres[rng.integers(0, centres.shape[0], n)] + noise
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    noise = rng.standard_normal((n_queries, d), dtype=np.float32) * np.float32(0.3 / np.sqrt(d))
    q = keys[rng.integers(0, n, n_queries)] + noise
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t0 = time.perf_counter()
    rows = simulate(keys, q, ks, nprobe=nprobe, say=say)
    doc = {"benchmark": "partitions", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "n_keys": n, "d_key": d,
           "queries": n_queries, "nprobe": nprobe, "rows": rows, "seconds_total": time.perf_counter() - t0}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return doc


__all__ = ["merge_topk", "simulate", "run_partition_sim"]
