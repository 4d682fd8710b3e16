"""apply_edit / rollback end to end on a tiny random Llama with a real KeyStore, LMDB store and ledger."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.config import ExpertConfig, KeyStoreConfig, SrmoaConfig, StoreConfig, TTTConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.generation import queries
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.ttt import edit as edit_mod
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.diversify import HeldOutLeak
from srmoa_dist.ttt.edit import EditFailed, EditResult, apply_edit, rollback
from srmoa_dist.ttt.ledger import EditLedger

D_KEY = 16
PROBES = ["Tell me a joke about cats", "How do I boil an egg?", "Why is the sky blue?", "Hi"]
FAILURE = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(make_tiny_world):
    base, fusion, enc = make_tiny_world(ExpertConfig(rank=4, alpha=8.0), D_KEY)
    yield base, fusion, enc
    fusion.remove()


class Env:
    """Fresh key store (6 random keys), LMDB store (their experts) and ledger for one test."""

    def __init__(self, tmp_path, fusion, *, tau=0.5, steps=40, lr=0.05, keys=None, contrast_prompts=0,
                 **ttt):
        # contrast rows off by default: the tiny model cannot learn them beside the fact in few steps
        self.cfg = SrmoaConfig(
            data_dir=str(tmp_path), expert=ExpertConfig(rank=4, alpha=8.0),
            keystore=KeyStoreConfig(d_key=D_KEY, tau=tau, k=4, device="cpu"),
            ttt=TTTConfig(steps=steps, lr=lr, verify_max_new_tokens=12, contrast_prompts=contrast_prompts,
                          **ttt))
        if keys is None:
            keys = np.random.default_rng(0).standard_normal((6, D_KEY)).astype(np.float32)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        self.ks = KeyStore(self.cfg.keystore)
        self.ids = [int(i) for i in self.ks.add(keys)]
        self.store = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=2))
        self.store.put_many({i: LoRAExpert.random(fusion.target_shapes(), 4, 8.0, "float16", seed=i)
                             for i in self.ids})
        self.ledger = EditLedger(self.cfg.ledger_dir)
        self.invalidated: list[list[int]] = []

    def kw(self, world, **extra):
        base, fusion, enc = world
        return dict(base=base, fusion=fusion, encoder=enc, store=self.store, keystore=self.ks,
                    ledger=self.ledger, cfg=self.cfg, invalidate=self.invalidated.append, **extra)


def test_verified_edit_then_rollback(world, tmp_path):
    env = Env(tmp_path, world[1])
    r = apply_edit(FAILURE, locality_prompts=PROBES, **env.kw(world))
    assert isinstance(r, EditResult) and r.status == "verified", r.reason
    assert r.created and r.expert_id == 6 and r.new_version == 1 and r.prev_version is None
    assert r.answer_ok and "Paris" in r.answer and 6 in r.routed_to and r.locality_changed == ()
    assert len(r.prompts) == 4 and r.rule and r.steps <= 40
    assert env.ks.is_pinned([6])[0] and len(env.ks) == 7
    assert env.store.versions([6]) == [1] and env.invalidated == [[6]]
    rec = env.ledger.get(r.edit_id)
    assert rec.status == "verified" and rec.new_key is not None and rec.extra["routed_to"] == [6]
    assert EditLedger(env.cfg.ledger_dir).get(r.edit_id).status == "verified"    # on disk

    out = rollback(r.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger,
                   invalidate=env.invalidated.append)
    assert out.status == "rolled_back" and len(env.ks) == 6 and 6 not in env.ks.active_ids()
    assert env.store.contains([6]) == [False] and len(env.store) == 6      # no orphaned record
    assert env.invalidated == [[6], [6]]
    with pytest.raises(ValueError, match="rolled_back"):
        rollback(r.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger)
    env.store.close()


@pytest.mark.parametrize("case", ["verified", "locality_break"])
def test_confirmed_verification_equals_decoding(world, tmp_path, monkeypatch, case):
    """ttt.confirm_greedy: the same outcome as decoding every re-ask, with fewer chats decoded."""
    decoded: dict[bool, list[int]] = {True: [], False: []}
    real = edit_mod.EditEnv._decode                # every decoding, `generate`'s and `reask`'s
    out = {}
    for confirm in (False, True):
        def spy(self, chats, _c=confirm):
            decoded[_c].append(len(chats))
            return real(self, chats)

        monkeypatch.setattr(edit_mod.EditEnv, "_decode", spy)
        extra = dict(tau=-1.0, keys=np.zeros((0, D_KEY), np.float32)) if case == "locality_break" else {}
        env = Env(tmp_path / str(confirm), world[1], confirm_greedy=confirm, **extra)
        out[confirm] = apply_edit(FAILURE, locality_prompts=PROBES, **env.kw(world))
        env.store.close()
    a, b = out[False], out[True]
    assert a.status == b.status and a.answer == b.answer and a.routed_to == b.routed_to
    assert a.locality_changed == b.locality_changed and a.locality_after == b.locality_after
    if case == "verified":
        assert b.status == "verified" and sum(decoded[True]) < sum(decoded[False]), decoded
        # the probes' outputs before the edit are decoded; after it they are confirmed (the tiny model's
        # answer may differ from its trained target, and is then decoded)
        assert decoded[True][0] == len(PROBES) and sum(decoded[True][1:]) <= 1, decoded
    else:                                     # every changed probe is refuted, then decoded
        assert b.status == "rolled_back" and b.locality_changed
        assert sum(decoded[True]) >= len(PROBES) + len(b.locality_changed), decoded


def test_failed_verification_rolls_back(world, tmp_path):
    env = Env(tmp_path, world[1], steps=1)                       # one step cannot teach the answer
    r = apply_edit(FAILURE, locality_prompts=PROBES, **env.kw(world))
    assert r.status == "rolled_back" and not r.answer_ok and "still fails" in r.reason
    assert len(env.ks) == 6 and env.ledger.get(r.edit_id).status == "rolled_back"
    assert env.store.contains([r.expert_id]) == [False]
    assert "verification failed" in env.ledger.get(r.edit_id).notes[-1]


def test_locality_break_rolls_back(world, tmp_path):
    # no deferral and no other expert: every probe reaches the new expert alone (gate 1)
    env = Env(tmp_path, world[1], tau=-1.0, keys=np.zeros((0, D_KEY), np.float32))
    r = apply_edit(FAILURE, locality_prompts=PROBES, **env.kw(world))
    assert r.status == "rolled_back" and r.locality_changed and "locality" in r.reason
    assert r.answer_ok and r.routed_to == (r.expert_id,)
    assert len(env.ks) == 0


def test_refine_commit_and_exact_rollback(world, tmp_path):
    base, fusion, enc = world
    qs = queries(base, enc, [[{"role": "user", "content": FAILURE.question}]])
    keys = np.random.default_rng(0).standard_normal((6, D_KEY)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    keys[3] = qs[0]                                             # expert 3 sits on the question
    env = Env(tmp_path, fusion, keys=keys)
    env.cfg = SrmoaConfig(data_dir=env.cfg.data_dir, expert=env.cfg.expert, keystore=env.cfg.keystore,
                          ttt=TTTConfig(steps=4, refine_radius=0.5))
    key3, exp3 = env.ks.get([3]).copy(), env.store.get_many([3])[0]
    r = apply_edit(FAILURE, verify=False, **env.kw(world))
    assert r.status == "committed" and not r.created and r.expert_id == 3
    assert r.prev_version == 1 and r.new_version == 2 and env.store.versions([3]) == [2]
    assert env.ks.is_pinned([3])[0] and not np.array_equal(env.ks.get([3]), key3)
    assert not env.store.get_many([3])[0].same_weights(exp3)

    # a second edit does not refine an expert that a live edit holds: it makes a new one
    r2 = apply_edit(FAILURE, verify=False, **env.kw(world))
    assert r2.created and r2.expert_id == 6

    rollback(r.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger)
    assert env.store.versions([3]) == [1] and env.store.get_many([3])[0].same_weights(exp3)
    assert np.array_equal(env.ks.get([3]), key3) and not env.ks.is_pinned([3])[0]
    assert env.ledger.get(r.edit_id).status == "rolled_back"
    assert env.ledger.get(r2.edit_id).status == "committed"
    env.store.close()


def test_rollback_refuses_when_a_later_edit_holds_the_expert(world, tmp_path):
    env = Env(tmp_path, world[1])
    r1 = apply_edit(FAILURE, verify=False, **env.kw(world))
    # force a second edit onto the same expert by allowing refinement of live experts
    env.cfg = SrmoaConfig(data_dir=env.cfg.data_dir, expert=env.cfg.expert, keystore=env.cfg.keystore,
                          ttt=TTTConfig(steps=2, refine_radius=0.0))
    r2 = apply_edit(FAILURE, verify=False, may_refine=lambda i: True, **env.kw(world))
    assert r2.expert_id == r1.expert_id and not r2.created and r2.new_version == 2
    with pytest.raises(ValueError, match="edited again"):
        rollback(r1.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger)
    rollback(r2.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger)
    assert env.store.versions([r1.expert_id]) == [1]
    rollback(r1.edit_id, store=env.store, keystore=env.ks, ledger=env.ledger)
    assert len(env.ks) == 6


def test_held_out_leak_writes_nothing(world, tmp_path):
    env = Env(tmp_path, world[1])
    with pytest.raises(HeldOutLeak):
        apply_edit(FAILURE, exclude=["capital of France"], **env.kw(world))
    assert len(env.ks) == 6 and len(env.ledger) == 0


def test_training_failure_frees_slot_and_records(world, tmp_path, monkeypatch):
    env = Env(tmp_path, world[1])

    def boom(base, fusion, jobs, cfg, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(edit_mod, "train_jobs", boom)
    with pytest.raises(EditFailed, match="out of memory") as ei:
        apply_edit(FAILURE, **env.kw(world))
    assert len(env.ks) == 6                                     # the reserved slot was freed
    rec = env.ledger.get(ei.value.edit_id)
    assert rec.status == "failed" and "out of memory" in rec.notes[0]


def test_rule_from_model_and_rule_only_verification(world, tmp_path):
    env = Env(tmp_path, world[1])
    failure = explicit_failure(FAILURE.question, "Rome", rule="Paris is the capital of France.")
    asked = []
    r = apply_edit(failure, ask=lambda p: asked.append(p) or "RULE: never used", verify=True, **env.kw(world))
    assert asked == []                                           # a given rule is not asked for
    assert r.rule == "Paris is the capital of France."
    assert r.answer_ok == (r.expert_id in r.routed_to)           # rule only: routing is what is checked
    f2 = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")
    r2 = apply_edit(f2, ask=lambda p: "RULE: The capital of France is Paris.", verify=False, **env.kw(world))
    assert r2.rule == "The capital of France is Paris."


def test_commit_failure_undoes_the_store_write(world, tmp_path):
    base, fusion, enc = world
    qs = queries(base, enc, [[{"role": "user", "content": FAILURE.question}]])
    keys = np.random.default_rng(0).standard_normal((6, D_KEY)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    keys[3] = qs[0]
    env = Env(tmp_path, fusion, keys=keys)
    env.cfg = SrmoaConfig(data_dir=env.cfg.data_dir, expert=env.cfg.expert, keystore=env.cfg.keystore,
                          ttt=TTTConfig(steps=2, refine_radius=0.5))
    key3 = env.ks.get([3]).copy()

    class FlakyKeys:
        def __init__(self, ks):
            self.ks = ks

        def __getattr__(self, name):
            return getattr(self.ks, name)

        def pin(self, ids, pinned=True):
            raise RuntimeError("key store actor died")

    kw = env.kw(world)
    kw["keystore"] = FlakyKeys(env.ks)
    with pytest.raises(EditFailed, match="commit failed.*actor died") as ei:
        apply_edit(FAILURE, verify=False, **kw)
    assert env.store.versions([3]) == [1] and np.array_equal(env.ks.get([3]), key3)
    assert env.ledger.get(ei.value.edit_id).status == "failed" and len(env.ks) == 6


def test_contrast_rows_keep_the_base_answer_about_the_subject(world, tmp_path):
    from srmoa_dist.ttt.edit import Edit
    from srmoa_dist.ttt.edit_env import EditEnv

    env = Env(tmp_path, world[1], contrast_prompts=2)
    base, fusion, enc = world
    e = Edit(EditEnv(base, fusion, enc, env.store, env.ks, env.ledger, env.cfg), FAILURE)
    rows = e._contrast_rows()
    assert [g.prompt.user_text for g in rows] == ["Tell me something interesting about France.",
                                                  "What is France known for?"]
    assert all(g.expert_id == -1 and g.prompt.structure == "contrast" and g.prompt.target for g in rows)
    assert all(g.query.shape == (D_KEY,) for g in rows)
    r = apply_edit(FAILURE, verify=False, **env.kw(world))           # they train beside the edit's rows
    assert r.status == "committed"


def test_a_batchs_contrast_answers_are_generated_in_one_batch(world, tmp_path, monkeypatch):
    """apply_edits asks the base model (no expert) once for every edit's contrast questions, and each
    edit then trains on those answers without asking again."""
    from srmoa_dist.model import generation
    from srmoa_dist.ttt.edit import Edit, apply_edits
    from srmoa_dist.ttt.edit_env import EditEnv

    base, fusion, enc = world
    env = Env(tmp_path, fusion, contrast_prompts=1)
    asked = []
    real = generation.generate

    def generate(base_, fusion_, encoder, chats, *a, **kw):
        if fusion_ is None:                                   # the base model alone: contrast answers
            asked.append([c[-1]["content"] for c in chats])
        return real(base_, fusion_, encoder, chats, *a, **kw)

    monkeypatch.setattr(generation, "generate", generate)
    ee = EditEnv(base, fusion, enc, env.store, env.ks, env.ledger, env.cfg)
    other = explicit_failure("What is the capital of Peru?", "Quito", correct_answer="Lima")
    edits = [Edit(ee, FAILURE), Edit(ee, other)]
    texts = [t for e in edits for t in e.contrast_texts()]
    assert len(texts) == 2 and "France" in texts[0] and "Peru" in texts[1]
    out = apply_edits(ee, edits, verify=False)
    assert asked == [texts]                                   # one batch, nothing asked twice
    assert all(r.status == "committed" for r in out)
    for e, t in zip(edits, texts):
        [row] = [p for p in e.job.prompts if p.structure == "contrast"]
        assert row.user_text == t and row.target == ee.base_answers[t]
    env.store.close()


def test_entity_experts_refine_the_subject_expert_and_verify_its_facts(world, tmp_path):
    env = Env(tmp_path, world[1], entity_experts=True, entity_replay_prompts=2)
    r1 = apply_edit(FAILURE, locality_prompts=PROBES, **env.kw(world))
    assert r1.status == "verified", r1.reason
    second = explicit_failure("Which currency does France use?", "Dollar", correct_answer="Franc")
    r2 = apply_edit(second, locality_prompts=PROBES, **env.kw(world))
    # the same expert, refined (not a new one), and the first fact re-checked after the commit
    assert not r2.created and r2.expert_id == r1.expert_id and r2.prev_version == r1.new_version
    assert r1.edit_id in r2.neighbours
    assert len(env.ks) == 7                                   # no second key for the subject
    if r2.status == "verified":
        assert r1.edit_id not in r2.neighbours_broken and "Franc" in r2.answer
        assert env.store.versions([r1.expert_id]) == [r1.new_version + 1]
    else:                                                     # rolled back: the first fact's version back
        assert env.store.versions([r1.expert_id]) == [r1.new_version]
    # a question about another subject makes its own expert
    other = explicit_failure("What is the capital of Peru?", "Quito", correct_answer="Lima")
    r3 = apply_edit(other, locality_prompts=PROBES, **env.kw(world))
    assert r3.expert_id != r1.expert_id
    env.store.close()
