"""routing/relation_bank.py: the mirror of edited relations, synced from a real KeyStore and a real
LMDB expert store (pinned slots, key versions, record headers), and the rows it offers the gate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from srmoa_dist.config import KeyStoreConfig, StoreConfig
from srmoa_dist.experts.expert import ExpertRelation, LoRAExpert
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.relation_bank import EditedRelations

D_KEY, D = 8, 6


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _expert(seed: int, subject: str | None = None, keys=None) -> LoRAExpert:
    e = LoRAExpert.random({"layers.1.mlp": (8, 8)}, rank=2, alpha=4.0, seed=seed)
    return e if subject is None else e.with_relation(ExpertRelation(subject, np.atleast_2d(keys)))


class Store:
    """A key store and an expert store on disk, written as an edit writes them."""

    def __init__(self, tmp_path) -> None:
        self.ks = KeyStore(KeyStoreConfig(d_key=D_KEY, tau=0.1))
        self.experts = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=2, map_size_mb=4))

    def edit(self, expert: LoRAExpert, *, pinned: bool = True, namespace: str = "default") -> int:
        [eid] = self.ks.add(_unit(np.random.default_rng(len(self.ks)).normal(size=(1, D_KEY))),
                            pinned=pinned, namespace=namespace).tolist()
        self.experts.put_many({eid: expert})
        return eid

    def refine(self, eid: int, expert: LoRAExpert) -> None:
        self.experts.put_many({eid: expert})
        self.ks.update([eid], _unit(np.random.default_rng(eid + 100).normal(size=(1, D_KEY))))


@pytest.fixture
def st(tmp_path):
    s = Store(tmp_path)
    yield s
    s.experts.close()


E0, E1, E2 = np.eye(D, dtype=np.float32)[:3]


def test_sync_mirrors_the_pinned_experts_with_a_relation(st):
    a = st.edit(_expert(1, "Zorblax", E0))
    b = st.edit(_expert(2, "Quuxland", [E1, E2]))
    st.edit(_expert(3))                                   # pinned, no relation (imported)
    st.edit(_expert(4, "Nope", E2), pinned=False)         # a seed key: not an edit
    bank = EditedRelations()
    assert len(bank) == 0 and bank.best_other(E0, a, E0[None], None) == float("-inf")
    assert bank.sync(st.ks, st.experts) == 3              # the three pinned slots were read
    assert len(bank) == 3 and bank.stats() == {"experts": 2, "rows": 3, "syncs": 1}
    assert bank.best_other(E1, a, E0[None], None) == pytest.approx(1.0)      # b's rows
    assert bank.best_other(E0, b, E1[None], None) == pytest.approx(1.0)      # a's row
    assert bank.sync(st.ks, st.experts) == 0              # nothing moved: nothing read


def test_a_refined_expert_is_read_again_and_a_freed_one_leaves(st):
    a = st.edit(_expert(1, "Zorblax", E0))
    b = st.edit(_expert(2, "Quuxland", E1))
    bank = EditedRelations()
    bank.sync(st.ks, st.experts)
    st.refine(b, _expert(5, "Quuxland", [E1, E2]))        # one more fact: a new record and key version
    assert bank.sync(st.ks, st.experts) == 1
    assert bank.best_other(E2, a, E0[None], None) == pytest.approx(1.0)
    st.ks.unpin([b])                                      # no longer an edit
    assert bank.sync(st.ks, st.experts) == 1 and len(bank) == 1
    assert bank.best_other(E1, a, E0[None], None) == float("-inf")          # only a's own row is left
    st.ks.free([a])
    assert bank.sync(st.ks, st.experts) == 1 and len(bank) == 0


def test_best_other_leaves_out_the_experts_own_relation_and_other_namespaces(st):
    near_e0 = _unit(E0 + 0.1 * E1)                        # another edit of e0's relation, reworded
    a = st.edit(_expert(1, "Zorblax", E0))
    st.edit(_expert(2, "Quuxland", near_e0))
    c = st.edit(_expert(3, "Blorp", E2), namespace="tenant-b")
    bank = EditedRelations()
    bank.sync(st.ks, st.experts)
    r = _unit(E0 + 0.5 * E2)                              # (D,)
    assert bank.best_other(r, a, E0[None], None) == pytest.approx(float(r @ near_e0), abs=1e-3)  # float16
    assert bank.best_other(r, a, E0[None], same_relation=0.9) == float("-inf")   # near_e0 is a's relation;
    assert bank.best_other(r, c, E2[None], None) == float("-inf")   # tenant-b sees no default-ns edit
    assert bank.best_other(r, 999, E2[None], None) == pytest.approx(float(r @ E0), abs=1e-3)  # unknown: all


def test_sync_errors_propagate_and_leave_the_mirror(st):
    st.edit(_expert(1, "Zorblax", E0))
    bank = EditedRelations(interval_s=60.0)
    assert bank.due()
    bank.sync(st.ks, st.experts)
    assert not bank.due()
    st.edit(_expert(2, "Quuxland", E1))
    st.experts.close()
    with pytest.raises(RuntimeError, match="closed"):
        bank.sync(st.ks, st.experts)
    assert len(bank) == 1


def test_pickles_as_an_empty_mirror_and_validates(st):
    st.edit(_expert(1, "Zorblax", E0))
    bank = EditedRelations(interval_s=3.0)
    bank.sync(st.ks, st.experts)
    back = pickle.loads(pickle.dumps(bank))
    assert len(back) == 0 and back.interval_s == 3.0
    with pytest.raises(ValueError, match="interval_s"):
        EditedRelations(interval_s=-1)


def test_of_holds_given_relations():
    bank = EditedRelations.of({3: [E0, E1], 4: 2 * E2})
    assert len(bank) == 3 and bank.stats()["experts"] == 2
    assert bank.best_other(E2, 3, E0[None], None) == pytest.approx(1.0)     # 4's row, unit length
    assert bank.best_other(E2, 4, E2[None], None) == pytest.approx(0.0)
