"""Edits as transactions: a crash between every two writes of an edit, then recovery (ttt/recovery.py).

The crash is real process death as far as the edit can tell: the real stores and ledger are wrapped so
that the N-th write raises `Crash` (a BaseException, so no `except Exception` cleanup of the edit runs)
before it happens. Recovery then runs over a ledger reopened from disk, as the restarted trainer would.
"""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.config import ExpertConfig, KeyStoreConfig, SrmoaConfig, StoreConfig, TTTConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.generation import queries
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.edit import apply_edit, rollback
from srmoa_dist.ttt.ledger import EditLedger
from srmoa_dist.ttt.recovery import RECOVERED, Recovery, audit

D_KEY = 16
PROBES = ["Tell me a joke about cats", "How do I boil an egg?"]
FAILURE = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")
STORE_WRITES = ("put_many", "delete", "rollback")
KEY_WRITES = ("add", "update", "pin", "free")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Crash(BaseException):
    """The process died here (not an Exception: nothing of the edit's own error handling runs)."""


class Writes:
    """Counts the writes to the wrapped store, key store and ledger; raises Crash before the N-th."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at, self.n, self.log = crash_at, 0, []

    def hit(self, what: str) -> None:
        self.n += 1
        self.log.append(what)
        if self.crash_at is not None and self.n == self.crash_at:
            raise Crash(f"crash before write {self.n} ({what})")


class Faulty:
    """A real store or key store whose write methods count (and crash) through `Writes`."""

    def __init__(self, inner, writes: Writes, names) -> None:
        self._inner, self._writes, self._names = inner, writes, names

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in self._names:
            return attr

        def write(*a, **k):
            self._writes.hit(name)
            return attr(*a, **k)
        return write


def faulty_ledger(ledger: EditLedger, writes: Writes) -> EditLedger:
    """The real ledger, its appends (every intent, commit and status line) counted first."""
    append = ledger._append

    def counted(line):
        writes.hit(f"ledger:{line.get('op')}:{line.get('status') or line.get('record', {}).get('status')}")
        return append(line)
    ledger._append = counted
    return ledger


@pytest.fixture(scope="module")
def world(make_tiny_world):
    base, fusion, enc = make_tiny_world(ExpertConfig(rank=4, alpha=8.0), D_KEY)
    yield base, fusion, enc
    fusion.remove()


class Env:
    """6 random keys (one on the question when `refine`), their experts, a ledger on disk."""

    def __init__(self, tmp_path, world, *, refine=False, steps=40):
        base, fusion, enc = world
        self.world = world
        self.cfg = SrmoaConfig(
            data_dir=str(tmp_path), expert=ExpertConfig(rank=4, alpha=8.0),
            keystore=KeyStoreConfig(d_key=D_KEY, tau=0.5, k=4, device="cpu"),
            ttt=TTTConfig(steps=steps, lr=0.05, verify_max_new_tokens=12, contrast_prompts=0,
                          refine_radius=0.5 if refine else 0.85))
        keys = np.random.default_rng(0).standard_normal((6, D_KEY)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        if refine:
            keys[3] = queries(base, enc, [[{"role": "user", "content": FAILURE.question}]])[0]
        self.ks = KeyStore(self.cfg.keystore)
        self.ks.add(keys)
        self.store = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=2))
        self.store.put_many({i: LoRAExpert.random(fusion.target_shapes(), 4, 8.0, "float16", seed=i)
                             for i in range(6)})
        self.before = self.state()

    def edit(self, writes: Writes, verify: bool) -> None:
        base, fusion, enc = self.world
        apply_edit(FAILURE, base=base, fusion=fusion, encoder=enc,
                   store=Faulty(self.store, writes, STORE_WRITES),
                   keystore=Faulty(self.ks, writes, KEY_WRITES),
                   ledger=faulty_ledger(EditLedger(self.cfg.ledger_dir), writes), cfg=self.cfg,
                   locality_prompts=PROBES if verify else (), verify=verify)

    def recover(self, **kw):
        ledger = EditLedger(self.cfg.ledger_dir)                  # the restarted trainer reads the file
        return Recovery(self.store, self.ks, ledger, **kw).run(), ledger

    def state(self):
        ids = self.ks.active_ids()
        ledger = EditLedger(self.cfg.ledger_dir)
        present = [i for i, c in zip(range(8), self.store.contains(list(range(8)))) if c]
        stored = dict(zip(present, self.store.versions(present)))
        return (ids.tolist(), self.ks.get(ids).round(6).tolist(), self.ks.is_pinned(ids).tolist(), stored,
                [(r.edit_id, r.status) for r in ledger.list()])


def _count_writes(tmp_path, world, **kw) -> list[str]:
    env = Env(tmp_path / "count", world, refine=kw.pop("refine", False), steps=kw.pop("steps", 40))
    w = Writes()
    env.edit(w, **kw)
    env.store.close()
    return w.log


SCENARIOS = {                  # the writes each makes, in order (checked: the protocol)
    "new expert, verified": (dict(verify=True), [
        "ledger:intent:intent", "add", "ledger:intent:intent", "ledger:intent:intent", "put_many", "update",
        "pin", "ledger:commit:committed", "ledger:status:verified"]),
    "refined expert, unverified commit": (dict(verify=False, refine=True), [
        "ledger:intent:intent", "put_many", "update", "pin", "ledger:commit:committed"]),
    "new expert, verification fails and rolls back": (dict(verify=True, steps=1), [
        "ledger:intent:intent", "add", "ledger:intent:intent", "ledger:intent:intent", "put_many", "update",
        "pin", "ledger:commit:committed", "ledger:status:rolling_back", "free", "delete",
        "ledger:status:rolled_back"]),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_crash_before_every_write_is_recovered(world, tmp_path, scenario):
    kw, writes = SCENARIOS[scenario]
    log = _count_writes(tmp_path, world, **kw)
    assert log == writes                                     # the intent is durable before any write
    for n in range(1, len(log) + 1):
        env = Env(tmp_path / f"crash-{n}", world, refine=kw.get("refine", False), steps=kw.get("steps", 40))
        with pytest.raises(Crash):
            env.edit(Writes(crash_at=n), verify=kw["verify"])
        report, ledger = env.recover()
        where = f"crash before write {n} ({log[n - 1]}) of {log}"
        a = audit(env.store, env.ks, ledger)
        assert a.ok, (where, a.to_json(), report.to_json())
        assert len(ledger) <= 1, where
        rec = ledger.list()[0] if len(ledger) else None
        if rec is not None:
            assert rec.status in ("failed", "rolled_back", "verified"), where
            if rec.status != "verified":                             # undone: the stores as before
                assert env.state()[:4] == env.before[:4], where
                assert any(RECOVERED in n_ for n_ in rec.notes) or rec.status == "rolled_back", where
        else:
            assert env.state()[:4] == env.before[:4], where
        again = env.state()
        report2, _ = env.recover()                               # recovering twice equals once
        assert not report2.changed and env.state() == again, (where, report2.to_json())
        env.store.close()


def test_an_intent_complete_on_disk_is_rolled_forward_when_unverified_edits_are_kept(world, tmp_path):
    log = _count_writes(tmp_path, world, verify=False)
    n = log.index("ledger:commit:committed") + 1                 # every write but the ledger's commit
    env = Env(tmp_path / "fwd", world)
    with pytest.raises(Crash):
        env.edit(Writes(crash_at=n), verify=False)
    report, ledger = env.recover(keep_unverified=True)
    [rec] = ledger.list()
    assert report.rolled_forward == (rec.edit_id,) and rec.status == "committed"
    assert audit(env.store, env.ks, ledger).ok and env.store.versions([rec.expert_id]) == [rec.new_version]
    # the trainer's policy (only verified edits count) rolls the same committed edit back
    report, ledger = env.recover()
    assert report.rolled_back == (rec.edit_id,) and ledger.get(rec.edit_id).status == "rolled_back"
    assert env.state()[:4] == env.before[:4]
    env.store.close()


def test_a_crash_in_recovery_is_finished_by_the_next(world, tmp_path):
    log = _count_writes(tmp_path, world, verify=False, refine=True)
    n = log.index("pin") + 1                                    # new version and key, no pin, no commit
    for m in (1, 2, 3):                                         # each write recovery makes
        env = Env(tmp_path / f"rec-{m}", world, refine=True)
        with pytest.raises(Crash):
            env.edit(Writes(crash_at=n), verify=False)
        w = Writes(crash_at=m)
        ledger = faulty_ledger(EditLedger(env.cfg.ledger_dir), w)
        try:
            Recovery(Faulty(env.store, w, STORE_WRITES), Faulty(env.ks, w, KEY_WRITES), ledger).run()
        except Crash:
            pass
        report, ledger = env.recover()
        assert audit(env.store, env.ks, ledger).ok and env.state()[:4] == env.before[:4], (m, w.log)
        assert ledger.list()[0].status == "failed"
        env.store.close()


def test_rollback_twice_after_a_crash_is_not_refused(world, tmp_path):
    """A refined expert's rollback that died after restoring the store (before the key): the retry
    finishes it instead of refusing with "changed since"."""
    env = Env(tmp_path, world, refine=True, steps=4)
    ledger = EditLedger(env.cfg.ledger_dir)
    base, fusion, enc = world
    r = apply_edit(FAILURE, base=base, fusion=fusion, encoder=enc, store=env.store, keystore=env.ks,
                   ledger=ledger, cfg=env.cfg, verify=False)
    assert not r.created and r.expert_id == 3 and r.new_version == 2
    w = Writes(crash_at=3)                                       # rolling_back, store.rollback, | update
    with pytest.raises(Crash):
        rollback(r.edit_id, store=Faulty(env.store, w, STORE_WRITES), keystore=Faulty(env.ks, w, KEY_WRITES),
                 ledger=faulty_ledger(ledger, w))
    assert env.store.versions([3]) == [1] and w.log == ["ledger:status:rolling_back", "rollback", "update"]
    ledger = EditLedger(env.cfg.ledger_dir)
    out = rollback(r.edit_id, store=env.store, keystore=env.ks, ledger=ledger)       # the retry
    assert out.status == "rolled_back" and env.state()[:4] == env.before[:4]
    env.store.close()


def test_rollback_of_a_committed_record_whose_store_was_already_restored(world, tmp_path):
    """The same retry when the ledger still says committed (no rolling_back line): no "changed since"."""
    env = Env(tmp_path, world, refine=True, steps=4)
    ledger = EditLedger(env.cfg.ledger_dir)
    base, fusion, enc = world
    r = apply_edit(FAILURE, base=base, fusion=fusion, encoder=enc, store=env.store, keystore=env.ks,
                   ledger=ledger, cfg=env.cfg, verify=False)
    env.store.rollback(3)                                        # the first try got this far
    out = rollback(r.edit_id, store=env.store, keystore=env.ks, ledger=ledger)
    assert out.status == "rolled_back" and env.state()[:4] == env.before[:4]
    env.store.close()


def test_sweep_frees_only_leaked_reservations(tmp_path):
    cfg = SrmoaConfig(data_dir=str(tmp_path),
                      keystore=KeyStoreConfig(d_key=D_KEY, tau=0.5, k=4, device="cpu"))
    ks = KeyStore(cfg.keystore)
    x = np.random.default_rng(1).standard_normal((3, D_KEY)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    seeds = ks.add(x)                                            # seed experts: unpinned
    imported = ks.add(x[:1], pinned=True)                        # pinned, a real key, no ledger entry
    leaked = ks.add(np.zeros((1, D_KEY), np.float32), pinned=True)   # reserved just before a crash
    store = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=1))
    ledger = EditLedger(cfg.ledger_dir)
    assert audit(store, ks, ledger).orphaned_slots == (int(imported[0]), int(leaked[0]))
    report = Recovery(store, ks, ledger).run()
    assert report.freed_slots == (int(leaked[0]),) and report.unowned_pinned == (int(imported[0]),)
    assert ks.active_ids().tolist() == [*seeds.tolist(), int(imported[0])]
    assert not Recovery(store, ks, ledger).run().changed
    store.close()


def test_an_error_right_after_the_reservation_frees_the_slot(world, tmp_path):
    """The slot is reserved but the intent does not name it yet when the store fails: `fail` frees it
    (a plain error, not a crash: the edit's own clean-up runs)."""
    from srmoa_dist.ttt.edit import EditFailed

    env = Env(tmp_path, world)

    class StoreDown:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def versions(self, ids):
            raise RuntimeError("shard actor unreachable")

    base, fusion, enc = world
    with pytest.raises(EditFailed, match="unreachable") as ei:
        apply_edit(FAILURE, base=base, fusion=fusion, encoder=enc, store=StoreDown(env.store),
                   keystore=env.ks,
                   ledger=EditLedger(env.cfg.ledger_dir), cfg=env.cfg, verify=False)
    ledger = EditLedger(env.cfg.ledger_dir)
    assert ledger.get(ei.value.edit_id).status == "failed" and env.state()[:4] == env.before[:4]
    assert audit(env.store, env.ks, ledger).ok
    env.store.close()
