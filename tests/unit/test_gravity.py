"""gravity.py: the SOME rules, their lazy bookkeeping, and property tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srmoa_dist.config import GravityConfig
from srmoa_dist.routing import gravity as gv
from srmoa_dist.routing.gravity import Activations, GravityState

D = 8


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_state(n: int, usage=None, pinned=None, free=None, step: int = 0) -> GravityState:
    return GravityState(
        usage=np.zeros(n, np.float32) if usage is None else np.asarray(usage, np.float32),
        utick=np.full(n, step, np.int64), dtick=np.full(n, step, np.int64),
        pinned=np.zeros(n, bool) if pinned is None else np.asarray(pinned, bool),
        free=np.zeros(n, bool) if free is None else np.asarray(free, bool), step=step)


def apply(keys: np.ndarray, state: GravityState, res: gv.GravityResult) -> None:
    """Apply a result in place the way the KeyStore does."""
    keys[res.moved_ids] = res.moved_keys
    state.usage[res.moved_ids] = res.moved_usage
    state.utick[res.moved_ids] = state.dtick[res.moved_ids] = res.step
    keys[res.decay_ids] = keys[res.decay_ids] * res.decay_factors[:, None]
    state.dtick[res.decay_ids] = res.step
    state.free[res.freed_ids] = True
    keys[res.freed_ids] = 0.0
    state.step = res.step


def one(q, ids, gates=None) -> Activations:
    ids = np.asarray(ids, np.int64).reshape(1, -1)
    g = np.full(ids.shape, 1.0 / ids.shape[1], np.float32) if gates is None else gates
    return Activations(np.asarray(q, np.float32).reshape(1, -1), ids, g)


# ----------------------------------------------------------------------------- Activations
def test_activations_validate_and_coerce():
    a = Activations(np.ones((2, D)), np.array([[0, -1], [1, 2]]), np.ones((2, 2)))
    assert a.queries.dtype == np.float32 and a.ids.dtype == np.int64 and a.gates.dtype == np.float32
    assert a.n == 2 and a.d == D
    with pytest.raises(ValueError, match="queries"):
        Activations(np.ones(D), np.zeros((1, 1)), np.ones((1, 1)))
    with pytest.raises(ValueError, match="ids"):
        Activations(np.ones((2, D)), np.zeros((3, 1), np.int64), np.ones((3, 1)))
    with pytest.raises(ValueError, match="gates"):
        Activations(np.ones((2, D)), np.zeros((2, 2), np.int64), np.ones((2, 3)))
    with pytest.raises(ValueError, match="gates"):
        Activations(np.ones((1, D)), np.zeros((1, 1), np.int64), -np.ones((1, 1)))
    with pytest.raises(ValueError, match="ids"):
        Activations(np.ones((1, D)), np.full((1, 1), -2), np.ones((1, 1)))
    with pytest.raises(ValueError, match="finite"):
        Activations(np.full((1, D), np.nan), np.zeros((1, 1), np.int64), np.ones((1, 1)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.ids = a.ids  # type: ignore[misc]


def test_activations_concat_pads():
    a = Activations(np.ones((1, D)), np.array([[0]]), np.array([[1.0]]))
    b = Activations(np.ones((2, D)), np.array([[1, 2], [3, -1]]), np.full((2, 2), 0.5))
    c = Activations.concat([a, b])
    assert c.ids.tolist() == [[0, -1], [1, 2], [3, -1]]
    assert c.gates[0].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- the rules
def test_query_pull_usage_and_inertia_exact():
    cfg = GravityConfig(alpha=0.2, beta=0.0, delta=0.0, usage_ema=0.9)
    keys = unit(np.eye(D)[:2] + 0.1)
    q = unit(np.eye(D)[3:4])
    state = make_state(2, usage=[0.0, 1.0])
    act = Activations(np.repeat(q, 2, 0), np.array([[0], [1]]), np.ones((2, 1)))
    res = gv.consolidate(keys, state, act, cfg)
    assert res.moved_ids.tolist() == [0, 1] and res.step == 1
    for j, u in enumerate([0.0, 1.0]):
        a = 0.2 / (1 + u)
        np.testing.assert_allclose(res.moved_keys[j], keys[j] + a * (q[0] - keys[j]), rtol=1e-5, atol=1e-6)
    # usage <- ema * usage + (1 - ema) * count
    np.testing.assert_allclose(res.moved_usage, [0.1, 0.9 * 1.0 + 0.1], rtol=1e-6)


def test_query_pull_is_gate_weighted_mean():
    cfg = GravityConfig(alpha=1.0, beta=0.0, delta=0.0, min_norm=0.0)
    keys = np.zeros((1, D), np.float32)
    q = np.zeros((2, D), np.float32)
    q[0, 0], q[1, 1] = 1.0, 1.0
    zero = np.zeros((2, 1), np.int64)
    res = gv.consolidate(keys, make_state(1), Activations(q, zero, np.array([[3.0], [1.0]])), cfg)
    np.testing.assert_allclose(res.moved_keys[0, :2], [0.75, 0.25], rtol=1e-6)
    # all-zero gates fall back to equal weights
    res = gv.consolidate(keys, make_state(1), Activations(q, zero, np.zeros((2, 1))), cfg)
    np.testing.assert_allclose(res.moved_keys[0, :2], [0.5, 0.5], rtol=1e-6)


def test_peer_pull_moves_coactivated_keys_together():
    cfg = GravityConfig(alpha=0.0, beta=0.1, delta=0.0)
    keys = unit(np.eye(D)[:3])
    res = gv.consolidate(keys, make_state(3), one(keys[2], [0, 1]), cfg)
    assert res.moved_ids.tolist() == [0, 1]
    np.testing.assert_allclose(res.moved_keys[0], keys[0] + 0.1 * (keys[1] - keys[0]), atol=1e-6)
    np.testing.assert_allclose(res.moved_keys[1], keys[1] + 0.1 * (keys[0] - keys[1]), atol=1e-6)
    before = np.linalg.norm(keys[0] - keys[1])
    assert np.linalg.norm(res.moved_keys[0] - res.moved_keys[1]) < before


def test_decay_norm_clamp_and_min_norm():
    cfg = GravityConfig(alpha=0.0, beta=0.0, delta=0.5, theta=0.5, min_norm=0.3)
    keys = unit(np.eye(D)[:3]) * np.array([[1.0], [0.5], [0.5]], np.float32)
    state = make_state(3, pinned=[False, False, True])
    res = gv.consolidate(keys, state, one(np.zeros(D), [-1]), cfg, sweep=np.arange(3))
    assert res.moved_ids.size == 0
    assert res.decay_ids.tolist() == [0, 1]                  # pinned key 2 does not decay
    np.testing.assert_allclose(res.decay_factors, [0.5, 0.5])
    assert res.freed_ids.tolist() == [1]                     # 0.25 < min_norm; pinned never freed
    assert res.changed_ids.tolist() == [0]
    # a pull that would leave the unit ball is clamped
    cfg = GravityConfig(alpha=1.0, beta=0.0, delta=0.0, min_norm=0.0)
    res = gv.consolidate(np.zeros((1, D), np.float32), make_state(1),
                         one(np.full(D, 3.0), [0]), cfg)
    assert np.linalg.norm(res.moved_keys[0]) == pytest.approx(1.0, abs=1e-6)


def test_free_slots_untouched_and_activations_stale():
    cfg = GravityConfig()
    keys = unit(np.random.default_rng(0).standard_normal((3, D)))
    state = make_state(3, free=[False, True, False])
    res = gv.consolidate(keys, state, one(keys[0], [0, 1]), cfg, sweep=np.arange(3))
    assert 1 not in res.moved_ids and 1 not in res.decay_ids and 1 not in res.freed_ids
    assert res.n_activations == 1 and res.n_stale == 1
    with pytest.raises(ValueError, match="slot"):
        gv.consolidate(keys, state, one(keys[0], [7]), cfg)


def test_consolidate_is_pure():
    rng = np.random.default_rng(1)
    keys = unit(rng.standard_normal((5, D)))
    state = make_state(5, usage=rng.random(5))
    k0, u0 = keys.copy(), state.usage.copy()
    gv.consolidate(keys, state, one(keys[0], [0, 1, 2]), GravityConfig(), sweep=np.arange(5))
    assert np.array_equal(keys, k0) and np.array_equal(state.usage, u0) and state.step == 0


def reference_decay_steps(u, s, r, t, cfg):
    """Loop version of decay_counts."""
    return sum(1 for j in range(r + 1, t + 1) if u * cfg.usage_ema ** (j - s) < cfg.theta)


@pytest.mark.parametrize("u,s,r,t", [(0.0, 0, 0, 5), (0.02, 0, 0, 200), (0.5, 3, 40, 400), (0.011, 2, 2, 3),
                                     (1.0, 0, 300, 700), (0.009, 0, 0, 1)])
def test_decay_counts_match_loop(u, s, r, t):
    cfg = GravityConfig(theta=0.01, usage_ema=0.99)
    st_ = GravityState(np.array([u], np.float32), np.array([s]), np.array([r]), np.zeros(1, bool),
                       np.zeros(1, bool), t)
    want = reference_decay_steps(np.float32(u), s, r, t, cfg)
    assert gv.decay_counts(st_, np.array([0]), t, cfg)[0] == want


def test_lazy_decay_equals_per_batch_decay():
    """Sweeping every key every batch (the per-batch rules) == sweeping rarely (lazy), up to rounding."""
    cfg = GravityConfig(alpha=0.1, beta=0.05, delta=0.01, theta=0.05, usage_ema=0.9, min_norm=0.01)
    rng = np.random.default_rng(3)
    n, T = 40, 60
    base = unit(rng.standard_normal((n, D)))
    acts = []
    for _ in range(T):
        ids = rng.integers(0, 10, (4, 2))                    # only keys 0..9 are ever used
        acts.append(Activations(unit(rng.standard_normal((4, D))), ids, rng.random((4, 2))))
    pinned = np.zeros(n, bool)
    pinned[[11, 12]] = True
    ka, sa = base.copy(), make_state(n, pinned=pinned.copy())
    kb, sb = base.copy(), make_state(n, pinned=pinned.copy())
    for i, a in enumerate(acts):
        apply(ka, sa, gv.consolidate(ka, sa, a, cfg, sweep=np.arange(n)))
        apply(kb, sb, gv.consolidate(kb, sb, a, cfg, sweep=np.arange(n) if i == T - 1 else None))
    np.testing.assert_allclose(ka, kb, rtol=1e-4, atol=1e-6)
    assert np.array_equal(sa.free, sb.free)
    np.testing.assert_allclose(gv.effective_usage(sa, np.arange(n), T, cfg),
                               gv.effective_usage(sb, np.arange(n), T, cfg), rtol=1e-5)
    assert np.array_equal(ka[11:13], base[11:13])            # pinned and unused: never decays


def test_decayed_key_is_freed_on_next_visit_and_its_activations_ignored():
    cfg = GravityConfig(alpha=0.5, delta=0.5, theta=1.0, min_norm=0.1)
    keys = unit(np.eye(D)[:2])
    state = make_state(2, step=10)
    state.dtick[:] = state.utick[:] = 0                     # 10 batches of pending decay: 0.5**10 < 0.1
    res = gv.consolidate(keys, state, one(keys[0], [0]), cfg)
    assert res.freed_ids.tolist() == [0] and res.moved_ids.size == 0 and res.n_stale == 1


def test_energy():
    cfg = GravityConfig(energy_pairs=256)
    rng = np.random.default_rng(0)
    spread = unit(rng.standard_normal((100, D)))
    collapsed = np.repeat(spread[:1], 100, 0)
    e_spread = gv.energy(spread, make_state(100), cfg, 0)
    assert gv.energy(collapsed, make_state(100), cfg, 0) == pytest.approx(1.0)   # repulsion only
    assert np.isfinite(e_spread) and e_spread == gv.energy(spread, make_state(100), cfg, 0)
    assert gv.energy(spread[:1], make_state(1), cfg) == 0.0
    assert gv.energy(spread, make_state(100, free=np.arange(100) > 0), cfg) == 0.0


# ----------------------------------------------------------------------------- properties
PROP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
floats = st.floats(-1.0, 1.0, allow_nan=False, width=32)


@st.composite
def scenes(draw):
    n = draw(st.integers(1, 12))
    nq = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, D)).astype(np.float32)
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1.0) * rng.uniform(0.5, 3.0, (n, 1))
    keys /= np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1.0)
    ids = rng.integers(-1, n, (nq, k))
    gates = rng.random((nq, k)).astype(np.float32) * (rng.random((nq, k)) > 0.2)
    queries = unit(rng.standard_normal((nq, D)))
    usage = rng.exponential(0.5, n).astype(np.float32) * (rng.random(n) > 0.3)
    pinned = rng.random(n) < 0.3
    free = rng.random(n) < 0.2
    cfg = GravityConfig(alpha=draw(st.floats(0.0, 0.6)), beta=draw(st.floats(0.0, 0.4)),
                        delta=draw(st.floats(0.0, 0.5)), theta=draw(st.floats(0.0, 2.0)),
                        usage_ema=draw(st.floats(0.5, 0.999)), min_norm=draw(st.floats(0.0, 0.5)))
    state = make_state(n, usage=usage, pinned=pinned, free=free, step=draw(st.integers(0, 50)))
    state.dtick[:] = state.step - rng.integers(0, 20, n)
    state.utick[:] = state.dtick - rng.integers(0, 20, n)
    return keys, state, Activations(queries, ids, gates), cfg


@PROP
@given(scenes())
def test_prop_norms_stay_at_most_one(scene):
    keys, state, act, cfg = scene
    res = gv.consolidate(keys, state, act, cfg, sweep=np.arange(keys.shape[0]))
    apply(keys, state, res)
    assert (np.linalg.norm(keys, axis=1) <= 1.0 + 1e-5).all()
    assert np.isfinite(keys).all()


@PROP
@given(scenes())
def test_prop_pinned_never_decay_nor_freed(scene):
    keys, state, act, cfg = scene
    k0 = keys.copy()
    res = gv.consolidate(keys, state, act, cfg, sweep=np.arange(keys.shape[0]))
    pinned = np.flatnonzero(state.pinned)
    assert not np.isin(res.freed_ids, pinned).any()
    assert not np.isin(res.decay_ids, pinned).any()
    apply(keys, state, res)
    assert np.array_equal(keys[pinned], k0[pinned])        # pinned keys are anchors: never move at all


@PROP
@given(scenes())
def test_prop_free_slots_untouched(scene):
    keys, state, act, cfg = scene
    free = np.flatnonzero(state.free)
    res = gv.consolidate(keys, state, act, cfg, sweep=np.arange(keys.shape[0]))
    for arr in (res.moved_ids, res.decay_ids, res.freed_ids):
        assert not np.isin(arr, free).any()


@PROP
@given(st.lists(floats, min_size=D, max_size=D), st.lists(floats, min_size=D, max_size=D),
       st.floats(0.0, 1.0), st.floats(0.0, 5.0), st.floats(0.0, 1.0))
def test_prop_query_pull_never_moves_a_key_away_from_its_query(k, q, alpha, usage, beta):
    key = np.asarray(k, np.float32)[None]
    key /= max(1.0, float(np.linalg.norm(key)))
    qv = np.asarray(q, np.float32)
    if np.linalg.norm(qv) < 1e-3:
        qv[0] = 1.0
    qv = unit(qv)
    cfg = GravityConfig(alpha=alpha, beta=beta, delta=0.0, min_norm=0.0)
    res = gv.consolidate(key, make_state(1, usage=[usage]), one(qv, [0]), cfg)
    before = np.linalg.norm(key[0] - qv)
    after = np.linalg.norm(res.moved_keys[0] - qv)
    assert after <= before + 1e-5


@PROP
@given(st.lists(floats, min_size=D, max_size=D), st.lists(floats, min_size=D, max_size=D),
       st.floats(0.01, 1.0), st.floats(0.0, 5.0), st.floats(0.01, 5.0))
def test_prop_heavier_key_moves_less(k, q, alpha, u_light, extra):
    key = np.asarray(k, np.float32)
    key /= max(1.0, float(np.linalg.norm(key)))
    qv = np.asarray(q, np.float32)
    if np.linalg.norm(qv) < 1e-3:
        qv[0] = 1.0
    qv = unit(qv)
    if np.linalg.norm(qv - key) < 1e-3:
        return
    keys = np.stack([key, key])
    cfg = GravityConfig(alpha=alpha, delta=0.0, min_norm=0.0)
    act = Activations(np.stack([qv, qv]), np.array([[0], [1]]), np.ones((2, 1)))
    res = gv.consolidate(keys, make_state(2, usage=[u_light, u_light + extra]), act, cfg)
    light, heavy = np.linalg.norm(res.moved_keys - keys, axis=1)
    assert heavy < light


def test_pinned_key_is_an_anchor_that_still_pulls_its_peers_and_counts_usage():
    cfg = GravityConfig(alpha=0.5, beta=0.5, delta=0.1, theta=0.5, usage_ema=0.5, min_norm=0.01)
    keys = np.eye(3, dtype=np.float32)
    state = make_state(3, pinned=[True, False, False])
    q = np.array([[0.0, 0.0, 1.0]], np.float32)
    act = Activations(q, np.array([[0, 1]]), np.array([[0.5, 0.5]], np.float32))
    res = gv.consolidate(keys, state, act, cfg)
    k = dict(zip(res.moved_ids.tolist(), res.moved_keys))
    np.testing.assert_array_equal(k[0], keys[0])                     # the edited key stays put
    assert k[1][0] > 0 and k[1][2] > 0                               # its peer is pulled to it and the query
    u = dict(zip(res.moved_ids.tolist(), res.moved_usage.tolist()))
    assert u[0] == pytest.approx(0.5)                                # usage still counts the activation


def test_held_keys_stay_still_for_the_batch_while_others_move():
    cfg = GravityConfig(alpha=0.5, beta=0.0, delta=0.5, theta=0.5, usage_ema=0.5, min_norm=0.01)
    keys = np.eye(4, dtype=np.float32)
    state = make_state(4)
    q = np.full((1, 4), 0.5, np.float32)
    act = Activations(q, np.array([[0, 1]]), np.array([[0.5, 0.5]], np.float32))
    res = gv.consolidate(keys, state, act, cfg, sweep=np.arange(4), hold=np.array([1, 3]))
    k = dict(zip(res.moved_ids.tolist(), res.moved_keys))
    np.testing.assert_array_equal(k[1], keys[1])                     # held: not pulled, not decayed
    assert not np.allclose(k[0], keys[0])                            # not held: pulled
    assert res.decay_ids.tolist() == [2]                             # 3 is held: its decay waits
