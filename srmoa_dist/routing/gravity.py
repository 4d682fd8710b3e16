"""SOME key-space dynamics as pure, vectorised numpy (no Python loop over keys).

Shapes: N slots, d key dimension, n activation rows (queries), k experts per row, E valid entries
(row, slot) with id >= 0, m keys touched by a batch.

One call of `consolidate` is one *batch step* t -> t + 1. For every key i the per-batch rules are

    n_i      = number of valid entries of the batch naming i (an activation count, gates ignored)
    a_i      = alpha / (1 + u_i),  b_i = beta / (1 + u_i)         (inertia; u_i is usage *before* the batch)
    k_i     += a_i * qbar_i + b_i * pbar_i                           (only if n_i > 0 and i is not anchored)
        qbar_i = sum_e w_e (q_e - k_i) / sum_e w_e                  over the entries e naming i
        pbar_i = sum_e w_e (c_e - k_i) / sum_e w_e                  over the entries with a peer in their row
        c_e    = sum_{e' in row(e), e' != e} w_e' k_e' / sum w_e'   (gate-weighted mean of the row's peers)
        w_e    = gate of entry e; a group whose gates sum to 0 uses equal weights instead
    u_i      = usage_ema * u_i + (1 - usage_ema) * n_i               (usage = EMA of activations per batch)
    k_i     *= (1 - delta)     if u_i (the updated usage) < theta and i is not pinned          (decay)
    k_i     /= max(1, |k_i|)                                         (norm clamp)
    free i                     if |k_i| < min_norm and i is not pinned

All right-hand sides use the keys as they were before the batch (simultaneous, Jacobi-style update).

**Anchored keys.** A pinned key (an edited expert's) is an anchor: SR-TTT trained it against its
neighbours with the router loss, and a query pull would drag it back toward whatever misrouted queries
reach it (for instance unedited questions about the same entity), undoing that separation. So a pinned
key never moves (no pull, no decay, never freed); its usage still counts its activations, and it still
pulls its co-activated peers. Keys *held* by a running edit (`hold`, the candidates whose keys the
edit's isolation check compares) are anchors for that batch only; every other key keeps moving.
With alpha + beta <= 1 the pull is a convex combination of the key, unit queries and keys of norm <= 1.
Entries naming a free slot are ignored (counted as stale); free slots are never touched.

**Lazy bookkeeping** (what keeps a batch O(batch) instead of O(N)): a key that is not activated only
sees its usage decay geometrically and its norm shrink, both in closed form. So each slot stores its
usage `u` valid at batch `utick` and its key as of batch `dtick` (utick <= dtick); at batch t

    usage(t)   = u * usage_ema ** (t - utick)
    pending(t) = (1 - delta) ** n_decay,  n_decay = #{j in (dtick, t] : u * usage_ema**(j - utick) < theta}

(n_decay = 0 for pinned keys). The pending decay is applied *in arrears*, when the slot is visited: a
batch visits the keys it activates plus a `sweep` of slots chosen by the caller (the KeyStore walks a
rotating window so every key is visited at least every `sweep_batches` batches). The stored key array,
and so the index derived from it, holds a key as of its last visit: decay, and freeing under min_norm,
reach it at most that many batches late, by exactly the amount the per-batch rules give (one power
(1 - delta) ** n instead of n multiplications: equal up to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from srmoa_dist.config import GravityConfig

ENERGY_SIGMA = 0.5        # length scale of the repulsion kernel in energy()


@dataclass(frozen=True)
class Activations:
    """A batch of routed requests: row r activated keys ids[r] (-1 = none) with gates[r]."""

    queries: np.ndarray  # (n, d) float32
    ids: np.ndarray      # (n, k) int64, -1 = no key
    gates: np.ndarray    # (n, k) float32, >= 0

    def __post_init__(self) -> None:
        q = np.asarray(self.queries)
        ids = np.asarray(self.ids)
        g = np.asarray(self.gates)
        if q.ndim != 2:
            raise ValueError(f"Activations.queries must be 2-D (n, d), got shape {q.shape}")
        if not np.issubdtype(q.dtype, np.floating):
            raise ValueError(f"Activations.queries must be floating point, got dtype {q.dtype}")
        if ids.ndim == 1 and q.shape[0] == ids.shape[0]:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[0] != q.shape[0]:
            raise ValueError(f"Activations.ids must have shape (n={q.shape[0]}, k), got {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Activations.ids must be integers, got dtype {ids.dtype}")
        if g.ndim == 1 and g.shape[0] == ids.shape[0]:
            g = g[:, None]
        if g.shape != ids.shape:
            raise ValueError(f"Activations.gates must have the shape of ids {ids.shape}, got {g.shape}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        g = np.ascontiguousarray(g, dtype=np.float32)
        if not np.isfinite(q).all():
            raise ValueError("Activations.queries must be finite")
        if not np.isfinite(g).all() or (g < 0).any():
            raise ValueError("Activations.gates must be finite and >= 0")
        if (ids < -1).any():
            raise ValueError(f"Activations.ids must be >= -1 (-1 = none), got {int(ids.min())}")
        object.__setattr__(self, "queries", q)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "gates", g)

    @property
    def n(self) -> int:
        return int(self.queries.shape[0])

    @property
    def d(self) -> int:
        return int(self.queries.shape[1])

    @staticmethod
    def concat(items: list[Activations]) -> Activations:
        """Stack batches (rows padded with -1 / 0 to the widest k)."""
        if not items:
            raise ValueError("Activations.concat needs at least one batch")
        k = max(a.ids.shape[1] for a in items)
        pad = lambda x, v: np.pad(x, ((0, 0), (0, k - x.shape[1])), constant_values=v)
        return Activations(np.concatenate([a.queries for a in items]),
                           np.concatenate([pad(a.ids, -1) for a in items]),
                           np.concatenate([pad(a.gates, 0.0) for a in items]))


@dataclass
class GravityState:
    """Per-slot state the rules read (views of the KeyStore's arrays, length N = used slots)."""

    usage: np.ndarray    # (N,) float32, EMA value valid at utick
    utick: np.ndarray    # (N,) int64
    dtick: np.ndarray    # (N,) int64, batch up to which the key's decay is materialised
    pinned: np.ndarray   # (N,) bool
    free: np.ndarray     # (N,) bool
    step: int            # batches consolidated so far

    def __post_init__(self) -> None:
        n = self.usage.shape[0]
        for name in ("utick", "dtick", "pinned", "free"):
            if getattr(self, name).shape != (n,):
                got = getattr(self, name).shape
                raise ValueError(f"GravityState.{name} must have shape ({n},), got {got}")


@dataclass(frozen=True)
class GravityResult:
    """What one batch changes; apply it in this order: moved, decayed, freed."""

    step: int                  # the new batch step (state.step + 1)
    moved_ids: np.ndarray      # (m,) int64 sorted: activated keys, now materialised at `step`
    moved_keys: np.ndarray     # (m, d) float32 their new key vectors
    moved_usage: np.ndarray    # (m,) float32 their new usage (utick = dtick = step)
    decay_ids: np.ndarray      # (s,) int64 swept keys whose pending decay shrank them
    decay_factors: np.ndarray  # (s,) float32: key *= factor, dtick = step
    freed_ids: np.ndarray      # (f,) int64 slots to free (norm under min_norm, not pinned)
    n_activations: int         # valid entries used
    n_stale: int               # entries naming a free (or just freed) slot, ignored

    @property
    def changed_ids(self) -> np.ndarray:
        """Slots whose key vector changed and stay active: the index updates only these."""
        ids = np.union1d(self.moved_ids, self.decay_ids)
        return np.setdiff1d(ids, self.freed_ids, assume_unique=True)


def effective_usage(state: GravityState, ids: np.ndarray, t: int, cfg: GravityConfig) -> np.ndarray:
    """usage(t) of `ids`, float64."""
    return state.usage[ids].astype(np.float64) * cfg.usage_ema ** (t - state.utick[ids]).astype(np.float64)


def decay_counts(state: GravityState, ids: np.ndarray, t: int, cfg: GravityConfig) -> np.ndarray:
    """n_decay of `ids` over batches (dtick, t]: how many of them found the key's usage under theta."""
    ids = np.asarray(ids, dtype=np.int64)
    if cfg.theta <= 0 or cfg.delta <= 0 or ids.size == 0:
        return np.zeros(ids.shape, dtype=np.int64)
    u = state.usage[ids].astype(np.float64)
    s, r = state.utick[ids], state.dtick[ids]
    with np.errstate(divide="ignore"):
        # u * ema**(j - s) < theta  <=>  j - s > log(theta / u) / log(ema) =: j0 (>= 0 when u >= theta)
        j0 = np.floor(np.log(cfg.theta / np.maximum(u, 1e-300)) / math.log(cfg.usage_ema))
    j0 = np.where(u < cfg.theta, -1.0, np.minimum(j0, 2.0**62)).astype(np.int64)
    first = np.maximum(r + 1, s + j0 + 1)
    n = np.clip(t - first + 1, 0, None)
    return np.where(state.pinned[ids], 0, n)


def decay_factors(counts: np.ndarray, cfg: GravityConfig) -> np.ndarray:
    """(1 - delta) ** counts as float32 (0 when it underflows)."""
    return np.power(1.0 - cfg.delta, counts.astype(np.float64)).astype(np.float32)


def effective_keys(keys: np.ndarray, state: GravityState, ids: np.ndarray, t: int,
                   cfg: GravityConfig) -> np.ndarray:
    """Keys of `ids` with their pending decay up to batch t applied (a copy, (m, d) float32)."""
    f = decay_factors(decay_counts(state, ids, t, cfg), cfg)
    return keys[ids] * f[:, None]


def _segment_sum(vals: np.ndarray, groups: np.ndarray, m: int) -> np.ndarray:
    """out[g] = sum of vals[e] over e with groups[e] == g; (E, d) -> (m, d)."""
    out = np.zeros((m, vals.shape[1]), dtype=np.float64)
    if groups.size == 0:
        return out
    order = np.argsort(groups, kind="stable")
    gs = groups[order]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    out[gs[starts]] = np.add.reduceat(vals[order].astype(np.float64), starts, axis=0)
    return out


def _group_weights(groups: np.ndarray, w: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry weights with the equal-weights fallback for groups whose weights sum to 0; and sums."""
    ws = np.bincount(groups, weights=w, minlength=m)
    zero = ws <= 0
    w_eff = np.where(zero[groups], 1.0, w)
    return w_eff, np.bincount(groups, weights=w_eff, minlength=m)


def consolidate(keys: np.ndarray, state: GravityState, act: Activations, cfg: GravityConfig,
                sweep: np.ndarray | None = None, hold: np.ndarray | None = None) -> GravityResult:
    """One batch step of the SOME rules (see the module docstring). Pure: reads, never writes, its inputs.

    keys: (N, d) float32 stored keys; sweep: slots whose pending decay is materialised this batch;
    hold: slots that stay anchored this batch (their pending decay waits for a later sweep).
    """
    if keys.ndim != 2:
        raise ValueError(f"keys must be 2-D (N, d), got shape {keys.shape}")
    n_slots, d = keys.shape
    if act.n and act.d != d:
        raise ValueError(f"Activations.queries have d={act.d}, keys have d_key={d}")
    if state.usage.shape[0] != n_slots:
        raise ValueError(f"state has {state.usage.shape[0]} slots, keys have {n_slots}")
    t = state.step + 1
    rows, cols = np.nonzero(act.ids >= 0)                          # (E,), row-major: rows sorted
    e_ids = act.ids[rows, cols]
    if e_ids.size and e_ids.max() >= n_slots:
        raise ValueError(f"Activations.ids name slot {int(e_ids.max())} but the store has {n_slots} slots")
    e_g = act.gates[rows, cols].astype(np.float64)
    n_valid = int(e_ids.size)

    # Materialise the activated keys up to t - 1; a key whose pending decay already put it under
    # min_norm was due to be freed: free it now and ignore its activations.
    live = ~state.free[e_ids]
    cand = np.unique(e_ids[live])
    k_prev = effective_keys(keys, state, cand, t - 1, cfg)                       # (m0, d)
    dead = (np.linalg.norm(k_prev, axis=1) < cfg.min_norm) & ~state.pinned[cand]
    pre_freed = cand[dead]
    if pre_freed.size:
        live &= ~np.isin(e_ids, pre_freed)
    rows, e_ids, e_g = rows[live], e_ids[live], e_g[live]
    q_e = act.queries[rows].astype(np.float64)                                  # (E, d)
    moved, inv = np.unique(e_ids, return_inverse=True)                          # (m,), (E,)
    m = moved.size
    k0 = k_prev[~dead].astype(np.float64)                                       # (m, d), same order
    u0 = effective_usage(state, moved, t - 1, cfg)                              # (m,)
    cnt = np.bincount(inv, minlength=m).astype(np.float64)

    # Query pull: gate-weighted mean of (q_e - k_i) over the entries naming i.
    w_q, ws_q = _group_weights(inv, e_g, m)
    qbar = _segment_sum(q_e * w_q[:, None], inv, m) / np.maximum(ws_q, 1e-300)[:, None] - k0

    # Peer pull: c_e = gate-weighted mean of the other entries of e's row.
    k_e = k0[inv]                                                               # (E, d)
    n_rows = act.n
    row_cnt = np.bincount(rows, minlength=n_rows)
    w_r, ws_r = _group_weights(rows, e_g, n_rows)
    row_sum = _segment_sum(k_e * w_r[:, None], rows, n_rows)                    # (n, d)
    peer_mass = ws_r[rows] - w_r                                                # (E,)
    has_peer = row_cnt[rows] > 1
    # A row whose other entries all have zero gate: equal weights over them.
    eq = has_peer & (peer_mass <= 1e-12)
    peer_sum = row_sum[rows] - k_e * w_r[:, None]
    if eq.any():
        row_plain = _segment_sum(k_e, rows, n_rows)
        peer_sum[eq] = row_plain[rows[eq]] - k_e[eq]
        peer_mass = np.where(eq, row_cnt[rows] - 1.0, peer_mass)
    c_e = peer_sum / np.maximum(peer_mass, 1e-300)[:, None]
    pe = np.flatnonzero(has_peer)
    w_p, ws_p = _group_weights(inv[pe], e_g[pe], m)
    pbar = _segment_sum((c_e[pe] - k_e[pe]) * w_p[:, None], inv[pe], m) / np.maximum(ws_p, 1e-300)[:, None]

    a = cfg.alpha / (1.0 + u0)
    b = cfg.beta / (1.0 + u0)
    held = np.empty(0, dtype=np.int64) if hold is None else np.asarray(hold, dtype=np.int64)
    anchored = state.pinned[moved] | np.isin(moved, held)                        # (m,)
    k1 = k0 + a[:, None] * qbar + b[:, None] * pbar                             # (m, d)
    k1[anchored] = k0[anchored]
    u1 = cfg.usage_ema * u0 + (1.0 - cfg.usage_ema) * cnt
    decays = (u1 < cfg.theta) & ~anchored
    k1[decays] *= 1.0 - cfg.delta
    norms = np.linalg.norm(k1, axis=1)
    clamp = np.where(anchored, 1.0, np.maximum(norms, 1.0))                     # anchors stay bit-identical
    k1 /= clamp[:, None]
    norms = norms / clamp
    freed_moved = moved[(norms < cfg.min_norm) & ~state.pinned[moved]]

    # Sweep: pending decay of swept keys not activated this batch, up to t (inclusive).
    if sweep is None:
        sweep = np.empty(0, dtype=np.int64)
    sweep = np.asarray(sweep, dtype=np.int64)
    sweep = sweep[~state.free[sweep]]
    sweep = np.setdiff1d(sweep, np.concatenate([moved, pre_freed, held]))
    counts = decay_counts(state, sweep, t, cfg)
    shrink = counts > 0
    decay_ids = sweep[shrink]
    f = decay_factors(counts[shrink], cfg)
    k_dec = keys[decay_ids] * f[:, None]
    freed_decay = decay_ids[(np.linalg.norm(k_dec, axis=1) < cfg.min_norm) & ~state.pinned[decay_ids]]

    freed = np.unique(np.concatenate([pre_freed, freed_moved, freed_decay]))
    return GravityResult(
        step=t,
        moved_ids=moved.astype(np.int64),
        moved_keys=k1.astype(np.float32),
        moved_usage=u1.astype(np.float32),
        decay_ids=decay_ids,
        decay_factors=f,
        freed_ids=freed.astype(np.int64),
        n_activations=int(e_ids.size),
        n_stale=n_valid - int(e_ids.size),
    )


def energy(keys: np.ndarray, state: GravityState, cfg: GravityConfig,
           rng: np.random.Generator | int | None = 0) -> float:
    """Monitoring energy of the key cloud on `cfg.energy_pairs` random pairs (i, j), i != j, of active keys.

        E = mean_p [ 0.5 * m_i * m_j * r_ij**2 ]  +  mean_p [ exp(-r_ij**2 / (2 * sigma**2)) ]
            attraction (harmonic, usage masses)     repulsion (Gaussian kernel, sigma = ENERGY_SIGMA)

    with r_ij = |key_i - key_j| on the stored keys (what the index searches) and masses m = 1 + usage(t).
    Attraction grows as the cloud spreads (heavy keys weigh more), repulsion as keys crowd together.
    0.0 with fewer than 2 active keys.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    active = np.flatnonzero(~state.free)
    if active.size < 2:
        return 0.0
    p = cfg.energy_pairs
    i = rng.integers(0, active.size, p)
    j = (i + rng.integers(1, active.size, p)) % active.size                     # j != i
    i, j = active[i], active[j]
    t = state.step
    ki = keys[i].astype(np.float64)
    kj = keys[j].astype(np.float64)
    r2 = np.einsum("pd,pd->p", ki - kj, ki - kj)
    mi = 1.0 + effective_usage(state, i, t, cfg)
    mj = 1.0 + effective_usage(state, j, t, cfg)
    attraction = float(np.mean(0.5 * mi * mj * r2))
    repulsion = float(np.mean(np.exp(-r2 / (2.0 * ENERGY_SIGMA**2))))
    return attraction + repulsion
