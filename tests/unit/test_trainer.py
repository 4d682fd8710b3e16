"""SR-TTT trainer on a tiny random Llama: isolation, loss, router CE, target choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from srmoa_dist.config import ExpertConfig, KeyStoreConfig, StoreConfig, TTTConfig
from srmoa_dist.experts.expert import LoRAExpert
from srmoa_dist.experts.store import ShardedExpertStore
from srmoa_dist.model.generation import queries
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.ttt.answer_loss import AnswerLoss, answer_lm_loss, lm_batch
from srmoa_dist.ttt.detect import explicit_failure
from srmoa_dist.ttt.diversify import diversify
from srmoa_dist.ttt.trainer import IsolationError, Target, TrainResult, choose_target, train_edit

D_KEY = 16
ECFG = ExpertConfig(rank=4, alpha=8.0)
N_EXPERTS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(make_tiny_world):
    """A private tiny model, fusion, encoder and 4 prompts' queries."""
    base, fusion, enc = make_tiny_world(ECFG, D_KEY)
    failure = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")
    prompts = diversify(failure, "Paris is the capital of France.")
    qs = queries(base, enc, [list(p.messages) for p in prompts])
    yield base, fusion, enc, prompts, qs
    fusion.remove()


def _stores(tmp_path, fusion, keys):
    ks = KeyStore(KeyStoreConfig(d_key=D_KEY, tau=0.3, k=4, device="cpu"))
    ids = ks.add(keys)
    store = ShardedExpertStore(tmp_path / "shards", StoreConfig(n_shards=2))
    shapes = fusion.target_shapes()
    store.put_many({int(i): LoRAExpert.random(shapes, 4, 8.0, "float16", seed=int(i)) for i in ids})
    return ks, store, ids


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _random_keys(n, seed=0):
    return _unit(np.random.default_rng(seed).standard_normal((n, D_KEY)))


def test_lm_batch_labels_answer_tokens_only(world):
    base, _, _, prompts, _ = world
    b = lm_batch(base.tokenizer, prompts, base.system_prompt)
    tok = base.tokenizer
    for i, p in enumerate(prompts):
        lab = b["labels"][i]
        ans = tok.decode(lab[lab >= 0])
        assert ans.startswith(p.target) and ans.endswith(tok.eos_token)       # answer + end of turn
        prompt_part = tok.decode(b["input_ids"][i][(lab < 0) & (b["attention_mask"][i] == 1)])
        assert p.user_text in prompt_part and p.target not in prompt_part.split("assistant")[-1]
    logits = torch.zeros(len(prompts), b["labels"].shape[1], len(tok))
    assert answer_lm_loss(logits, b["labels"]).item() == pytest.approx(np.log(len(tok)), rel=1e-5)


def test_answer_loss_shortcut_equals_full_forward(world):
    base, fusion, _, prompts, _ = world
    b = lm_batch(base.tokenizer, prompts, base.system_prompt)
    te = fusion.trainable(LoRAExpert.random(fusion.target_shapes(), 4, 8.0, "float32", seed=3))
    with fusion.routing([[te]] * len(prompts)):
        fast = AnswerLoss(base, b)()
        full = AnswerLoss(base, b, full_forward=True)()
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    fast.backward()
    assert all(p.grad is not None for p in te.parameters())


def test_answer_loss_computes_unadapted_layers_once(make_tiny_world):
    """With the adapters on layer 3 only, layers 2 (above Lq = 1) joins the part computed once: the
    loss still equals the full forward's, and its gradient reaches the expert."""
    base, fusion, _ = make_tiny_world(ExpertConfig(rank=4, alpha=8.0, first_layer=3), D_KEY)
    try:
        failure = explicit_failure("What is the capital of France?", "Rome", correct_answer="Paris")
        prompts = diversify(failure, "Paris is the capital of France.")
        b = lm_batch(base.tokenizer, prompts, base.system_prompt)
        te = fusion.trainable(LoRAExpert.random(fusion.target_shapes(), 4, 8.0, "float32", seed=3))
        with fusion.routing([[te]] * len(prompts)):
            loss = AnswerLoss(base, b, first_adapted=fusion.first_layer)
            fast = loss()
            full = AnswerLoss(base, b, full_forward=True)()
        assert loss.start == 3
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        fast.backward()
        assert all(p.grad is not None for p in te.parameters())
    finally:
        fusion.remove()


def test_only_target_changes_and_loss_decreases(world, tmp_path):
    base, fusion, _, prompts, qs = world
    ks, store, ids = _stores(tmp_path, fusion, _random_keys(N_EXPERTS))
    params = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    keys_before = ks.get(ids).copy()
    experts_before = store.get_many([int(i) for i in ids])
    versions_before = store.versions([int(i) for i in ids])
    slots = []

    def new_slot():
        slots.append(int(ks.add(np.zeros((1, D_KEY), np.float32), pinned=True)[0]))
        return slots[-1]

    res = train_edit(base, fusion, prompts, qs, ks, store, TTTConfig(steps=16), ks.cfg, ECFG,
                     new_slot=new_slot)
    assert isinstance(res, TrainResult) and res.created and res.expert_id == slots[0] == N_EXPERTS
    assert res.steps == 16 and len(res.lm_losses) == 17 and len(res.router_losses) == 17
    assert res.lm_losses[-1] < 0.8 * res.lm_losses[0]
    assert res.key.dtype == np.float32 and res.key.shape == (D_KEY,) and np.linalg.norm(res.key) <= 1 + 1e-6
    assert res.expert.dtype == "float16" and res.expert.rank == 4
    assert any(np.abs(b.astype(np.float32)).sum() > 0 for _, b in res.expert.targets.values())  # B left 0
    # everything but the target: bit-identical
    for n, p in base.model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert p.grad is None and not p.requires_grad
    assert np.array_equal(ks.get(ids), keys_before)
    for e0, e1 in zip(experts_before, store.get_many([int(i) for i in ids])):
        assert e0 == e1
    assert store.versions([int(i) for i in ids]) == versions_before
    assert not fusion.active
    store.close()


def test_router_ce_pushes_target_to_top1(world, tmp_path):
    base, fusion, _, prompts, qs = world
    rng = np.random.default_rng(1)
    m = _unit(qs.mean(0))
    rivals = 0.6 * _unit(qs + 0.3 * rng.standard_normal(qs.shape))          # one close rival per prompt
    ks, store, ids = _stores(tmp_path, fusion, np.concatenate([rivals, (0.3 * m)[None]]))
    target = int(ids[-1])
    before = qs @ ks.get([target])[0]
    rival_scores = qs @ ks.get(ids[:-1]).T                                     # (P, 4)
    assert (before < rival_scores.max(1)).all()                                # not top-1 anywhere at first
    cfg = TTTConfig(steps=16, router_lambda=1.0, key_lr=0.05)
    res = train_edit(base, fusion, prompts, qs, ks, store, cfg, ks.cfg, ECFG, new_slot=lambda: -1,
                     target=Target(target, False, float(m @ ks.get([target])[0])))
    assert not res.created and res.prev_version == 1 and np.array_equal(res.prev_key, ks.get([target])[0])
    after = qs @ res.key
    assert (after > rival_scores.max(1)).all(), (after, rival_scores.max(1))  # top-1 for every prompt
    assert (after > ks.cfg.tau).all()                                          # and above the deferral bar
    assert res.router_losses[-1] < 0.5 * res.router_losses[0]
    store.close()


def test_choose_target(world, tmp_path):
    _, fusion, _, _, qs = world
    m = _unit(qs.mean(0))
    keys = np.concatenate([_random_keys(3, seed=2), _unit(m + 0.05 * _random_keys(1, seed=3))])
    ks, store, ids = _stores(tmp_path, fusion, keys)
    near = int(ids[-1])
    cfg = TTTConfig(refine_radius=0.8)
    t = choose_target(qs, ks, cfg, new_slot=lambda: 99)
    assert t == Target(near, False, pytest.approx(t.score)) and t.score >= 0.8
    t = choose_target(qs, ks, cfg, new_slot=lambda: 99, may_refine=lambda i: i != near)
    assert t.created and t.expert_id == 99
    t = choose_target(qs, ks, TTTConfig(refine_radius=1.0), new_slot=lambda: 98)
    assert t.created and t.expert_id == 98
    with pytest.raises(ValueError, match="invalid expert id"):
        choose_target(qs, ks, TTTConfig(refine_radius=1.0), new_slot=lambda: -1)
    store.close()


def test_isolation_violation_is_caught(world, tmp_path):
    base, fusion, _, prompts, qs = world
    ks, store, _ = _stores(tmp_path, fusion, _random_keys(2))
    emb = base.model.get_input_embeddings().weight
    saved = emb.detach().clone()

    def tamper(module, args):
        with torch.no_grad():
            emb[0, 0] += 1.0

    h = base.model.model.norm.register_forward_pre_hook(tamper)     # runs inside every training step
    try:
        with pytest.raises(IsolationError, match="embed_tokens"):
            train_edit(base, fusion, prompts, qs, ks, store, TTTConfig(steps=2), ks.cfg, ECFG,
                       new_slot=lambda: 50)
    finally:
        h.remove()
        with torch.no_grad():
            emb.copy_(saved)
    store.close()


def test_converges_early_and_validates(world, tmp_path):
    base, fusion, _, prompts, qs = world
    ks, store, _ = _stores(tmp_path, fusion, _random_keys(2))
    cfg = TTTConfig(steps=8, converge_loss=100.0, reask_token_p=None)
    res = train_edit(base, fusion, prompts, qs, ks, store, cfg, ks.cfg, ECFG, new_slot=lambda: 7)
    assert res.converged and res.steps == 0 and len(res.lm_losses) == 1
    with pytest.raises(ValueError, match="queries must be"):
        train_edit(base, fusion, prompts, qs[:2], ks, store, TTTConfig(), ks.cfg, ECFG, new_slot=lambda: 7)
    store.close()


def test_guard_rows_keep_the_neighbours_queries_on_their_own_expert(world, tmp_path):
    """A new expert next to an edited neighbour (same entity): trained under the mixture with the
    neighbour's prompts as guards, its key ends below the neighbour's on the neighbour's own queries
    and above it on its own, and the guard rows' answer loss is reported."""
    from srmoa_dist.ttt.trainer import Guard

    base, fusion, enc, prompts, qs = world
    other = diversify(explicit_failure("What is the currency of France?", "Lira", correct_answer="Franc"),
                      "The currency of France is the Franc.")
    q_other = queries(base, enc, [list(p.messages) for p in other])                 # (4, d)
    neighbour_key = _unit(q_other.mean(0))
    ks, store, ids = _stores(tmp_path, fusion, neighbour_key[None])
    nid = int(ids[0])
    guards = [Guard(nid, p, q_other[j]) for j, p in enumerate(other[:2])]
    cfg = TTTConfig(steps=12, router_lambda=1.0, key_lr=0.05, converge_loss=0.0)
    slots = []

    def new_slot():
        slots.append(int(ks.add(np.zeros((1, D_KEY), np.float32), pinned=True)[0]))
        return slots[-1]

    res = train_edit(base, fusion, prompts, qs, ks, store, cfg, ks.cfg, ECFG, new_slot=new_slot,
                     tau=-1.0, guards=guards)
    assert res.guard_ids == (nid,) and len(res.guard_losses) == len(res.lm_losses)
    assert all(np.isfinite(res.guard_losses))
    g_q = q_other[:2]
    assert (g_q @ res.key < g_q @ neighbour_key).all()                # guard queries stay with the neighbour
    assert (qs @ res.key > qs @ neighbour_key).all()                  # the edit's own queries come to it
    assert np.array_equal(ks.get([nid])[0], neighbour_key)            # the neighbour's key never moved
    store.close()


def test_candidate_keys_are_held_during_training_and_released_after(world, tmp_path):
    base, fusion, _, prompts, qs = world
    ks, store, ids = _stores(tmp_path, fusion, _random_keys(N_EXPERTS))
    seen = []
    real_hold = ks.hold

    def hold(cand, ttl_s):
        seen.append(sorted(int(i) for i in cand))
        real_hold(cand, ttl_s)

    ks.hold = hold
    train_edit(base, fusion, prompts, qs, ks, store, TTTConfig(steps=2), ks.cfg, ECFG, new_slot=lambda: 99)
    assert seen and set(seen[0]) <= {int(i) for i in ids}               # the retrieved candidates
    assert ks.held_ids().size == 0                                      # let go after training
    store.close()


def test_relation_drops_same_subject_guards_and_rivals_and_travels_with_the_expert(world, tmp_path):
    """With a relation (the relation gate on), a neighbour about the same subject is kept apart by the
    gate at serving: it is neither a guard row nor a rival in the edit's rows; the trained expert
    carries the relation, and refining the neighbour adds this fact's key to its relation."""
    from srmoa_dist.experts.expert import ExpertRelation
    from srmoa_dist.ttt.trainer import Guard, TrainingJob, train_jobs

    base, fusion, enc, prompts, qs = world
    other = diversify(explicit_failure("What is the currency of France?", "Lira", correct_answer="Franc"),
                      "The currency of France is the Franc.")
    q_other = queries(base, enc, [list(p.messages) for p in other])                 # (4, d)
    ks, store, ids = _stores(tmp_path, fusion, _unit(qs.mean(0))[None] * 0.9 + _unit(q_other.mean(0)) * 0.1)
    nid = int(ids[0])
    rng = np.random.default_rng(0)
    old = ExpertRelation("France", _unit(rng.standard_normal((1, 8))))
    [neighbour] = store.get_many([nid])
    store.put_many({nid: neighbour.with_relation(old)})
    rel = ExpertRelation("france", _unit(rng.standard_normal((1, 8))))
    guards = [Guard(nid, p, q_other[j]) for j, p in enumerate(other[:2])]
    cfg = TTTConfig(steps=2)

    def job(target=None, relation=rel):
        return TrainingJob(base, fusion, prompts, qs, ks, store, cfg, ks.cfg, ECFG, new_slot=lambda: 50,
                           target=target, tau=-1.0, guards=guards, relation=relation)

    plain = job(Target(50, True, float("nan")), relation=None)
    plain.build()
    assert plain.G == 2 and any(plain.row_rivals[r] for r in range(plain.P))
    gated = job(Target(50, True, float("nan")))
    gated.build()
    assert gated.G == 0 and not any(gated.row_rivals[r] for r in range(gated.P))
    [res] = train_jobs(base, fusion, [job(Target(50, True, float("nan")))], cfg)
    assert res.expert.relation is rel
    [refined] = train_jobs(base, fusion, [job(Target(nid, False, 0.9))], cfg)
    assert refined.expert.relation.subject == "France" and refined.expert.relation.keys.shape == (2, 8)
    store.close()


def _job(world, tmp_path, cfg, guards=()):
    from srmoa_dist.ttt.trainer import TrainingJob

    base, fusion, _, prompts, qs = world
    ks, store, _ = _stores(tmp_path, fusion, _random_keys(2))
    return TrainingJob(base, fusion, prompts, qs, ks, store, cfg, ks.cfg, ECFG, new_slot=lambda: 7,
                       guards=guards)


def test_token_probability_stop(world, tmp_path):
    """converge_token_p: a job is done once every answer token of its own rows has p >= the threshold
    (worst NLL <= -log p), though the mean loss is still above converge_loss; guard rows do not count
    towards it, and a guard row that got worse still holds the job back."""
    from srmoa_dist.ttt.trainer import Guard

    P = len(world[3])
    at = float(-np.log(0.6))
    job = _job(world, tmp_path, TTTConfig(converge_token_p=0.6))
    job.record(torch.full((P,), 0.3), torch.full((P,), at * 1.01), torch.tensor(1.0))
    assert not job.done                                         # one token under 0.6
    job.record(torch.full((P,), 0.3), torch.full((P,), at * 0.99), torch.tensor(1.0))
    assert job.done and job.converged and job.lm_losses == [pytest.approx(0.3)] * 2

    off = _job(world, tmp_path / "off", TTTConfig(reask_token_p=None))   # the mean-loss test only
    off.record(torch.full((P,), 0.3), torch.zeros(P), torch.tensor(1.0))
    assert not off.done
    off.record(torch.full((P,), 0.04), torch.full((P,), 3.0), torch.tensor(1.0))
    assert off.done                                             # mean loss < 0.05

    base, _, enc, prompts, qs = world
    guard = Guard(3, prompts[0], qs[0])
    g = _job(world, tmp_path / "g", TTTConfig(converge_token_p=0.6), guards=[guard])
    assert g.G == 1
    rows = lambda own, guard: torch.tensor([own] * P + [guard])  # noqa: E731
    g.record(rows(1.0, 0.5), rows(1.0, 9.0), torch.tensor(1.0))   # guard's own worst token is ignored
    g.record(rows(0.3, 1.0), rows(0.1, 9.0), torch.tensor(1.0))   # guard got 0.5 nats worse (> 0.3)
    assert not g.done
    g.record(rows(0.3, 0.6), rows(0.1, 9.0), torch.tensor(1.0))
    assert g.done
    with pytest.raises(ValueError, match="converge_token_p"):
        TTTConfig(converge_token_p=0.3)
    with pytest.raises(ValueError, match="converge_token_p"):
        TTTConfig(converge_token_p=1.0)


def test_with_rows_reports_each_rows_mean_and_worst_token(world):
    base, fusion, _, prompts, _ = world
    b = lm_batch(base.tokenizer, prompts, base.system_prompt)
    loss = AnswerLoss(base, b)
    total, mean, worst = loss.with_rows()
    nll = loss._token_nll().detach()                            # (N,)
    for r in range(len(prompts)):
        mine = nll[loss.rows == r]
        assert mean[r] == pytest.approx(float(mine.mean()), rel=1e-5)
        assert worst[r] == pytest.approx(float(mine.max()), rel=1e-5)
    assert float(total) == pytest.approx(float(mean.mean()), rel=1e-5)


def test_bfloat16_training_follows_float32_and_keeps_isolation(world, tmp_path):
    """train_dtype bfloat16: the same losses as float32 within bf16 rounding, and the base model is
    untouched (train_edit's isolation check, on by default, raises otherwise)."""
    from srmoa_dist.ttt.answer_loss import train_dtype

    base, fusion, _, prompts, qs = world
    ks, store, _ = _stores(tmp_path, fusion, _random_keys(2))
    runs = {dt: train_edit(base, fusion, prompts, qs, ks, store,
                           TTTConfig(steps=4, converge_loss=0.0, train_dtype=dt), ks.cfg, ECFG,
                           new_slot=lambda: 7, tau=1.0)
            for dt in ("float32", "bfloat16")}
    f32, bf16 = runs["float32"].lm_losses, runs["bfloat16"].lm_losses
    assert len(f32) == len(bf16) == 5
    np.testing.assert_allclose(bf16, f32, rtol=0.05)
    assert bf16 != f32                                           # it did run in another dtype
    assert runs["bfloat16"].final_lm_loss < bf16[0]
    assert train_dtype("float32", "cpu") == torch.float32 and train_dtype("bfloat16", "cpu") == torch.bfloat16
    store.close()


@pytest.mark.parametrize("bf16,amx,want", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                           (False, False, "float32")])
def test_auto_train_dtype_is_bfloat16_only_with_bf16_kernels(monkeypatch, bf16, amx, want):
    from srmoa_dist.ttt.answer_loss import train_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert train_dtype("auto", "cpu") == getattr(torch, want)
    assert train_dtype("float32", "cpu") == torch.float32          # an explicit choice is kept
    with pytest.raises(ValueError, match="train_dtype"):
        TTTConfig(train_dtype="float16")


def test_reask_token_p_holds_the_job_until_the_question_as_asked_is_likely(world, tmp_path):
    """reask_token_p (0.6 by default): a mean loss under converge_loss is not enough while one answer token
    of a held row is less likely. With reask_rows "instruction" only the question as asked (which
    verification decodes greedily) counts; with "own" (the default) every prompt of the edit does."""
    P = len(world[3])
    job = _job(world, tmp_path, TTTConfig(reask_rows="instruction"))
    assert job.reask_rows == [0] and job.prompts[0].structure == "instruction"
    low = float(-np.log(0.5))                                   # p 0.5 < 0.6
    worst = torch.tensor([low] + [0.1] * (P - 1))
    job.record(torch.full((P,), 0.04), worst, torch.tensor(1.0))
    assert not job.done                                         # mean loss 0.04 < 0.05, but one token at 0.5
    job.record(torch.full((P,), 0.04), torch.tensor([0.4] + [5.0] * (P - 1)), torch.tensor(1.0))
    assert job.done and job.converged                           # p 0.67 on the asked row; others ignored
    for bad in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="reask_token_p"):
            TTTConfig(reask_token_p=bad)
    assert TTTConfig().reask_rows == "own"
    own = _job(world, tmp_path / "own", TTTConfig())
    assert own.reask_rows == list(range(P))
    own.record(torch.full((P,), 0.04), torch.tensor([0.4] + [5.0] * (P - 1)), torch.tensor(1.0))
    assert not own.done                                         # every own row counts
    own.record(torch.full((P,), 0.04), torch.full((P,), 0.4), torch.tensor(1.0))
    assert own.done
    with pytest.raises(ValueError, match="reask_rows"):
        TTTConfig(reask_rows="all")


def test_jobs_trained_together_match_each_trained_alone(world, tmp_path, monkeypatch):
    """train_jobs: each job's losses and expert are what training it alone gives, and a job that has
    converged leaves the batch (the rows are rebuilt for the jobs still stepping)."""
    from srmoa_dist.ttt import trainer as trainer_mod
    from srmoa_dist.ttt.trainer import TrainingJob, train_jobs

    base, fusion, enc, prompts, qs = world
    other = diversify(explicit_failure("What is the currency of Peru?", "Euro", correct_answer="Sol"),
                      "The currency of Peru is the Sol.")
    q_other = queries(base, enc, [list(p.messages) for p in other])
    ks, store, _ = _stores(tmp_path, fusion, _random_keys(2))
    long = TTTConfig(steps=4, converge_loss=0.0, reask_token_p=None, train_dtype="float32")

    def job(ps, q, cfg, slot):
        return TrainingJob(base, fusion, ps, q, ks, store, cfg, ks.cfg, ECFG, new_slot=lambda: slot, tau=0.3)

    [probe] = train_jobs(base, fusion, [job(prompts, qs, long, 7)], long)
    losses = probe.lm_losses                                    # 5: one per step and the final measure
    early = TTTConfig(steps=4, converge_loss=(losses[1] + losses[2]) / 2, reask_token_p=None,
                      train_dtype="float32")                    # converges after 2 updates
    alone = [train_jobs(base, fusion, [job(prompts, qs, early, 7)], long)[0],
             train_jobs(base, fusion, [job(other, q_other, long, 8)], long)[0]]
    sizes = []
    real = trainer_mod._JointSteps.batch_of
    monkeypatch.setattr(trainer_mod._JointSteps, "batch_of",
                        lambda self, jobs: sizes.append(len(jobs)) or real(self, jobs))
    together = train_jobs(base, fusion, [job(prompts, qs, early, 7), job(other, q_other, long, 8)], long)
    assert sizes == [2, 1]                                      # the converged job's rows left the batch
    assert [r.steps for r in together] == [a.steps for a in alone] == [2, 4]
    for a, t in zip(alone, together):
        np.testing.assert_allclose(t.lm_losses, a.lm_losses, rtol=1e-4)
        np.testing.assert_allclose(t.key, a.key, atol=1e-5)
        for name, (A, B) in a.expert.targets.items():
            At, Bt = t.expert.targets[name]
            np.testing.assert_allclose(At.astype(np.float32), A.astype(np.float32), atol=2e-3)
            np.testing.assert_allclose(Bt.astype(np.float32), B.astype(np.float32), atol=2e-3)
    store.close()


def test_a_deferring_gate_keeps_edits_about_unnamed_subjects_out_of_the_rows(world, tmp_path):
    """named_only (the relation gate defers): serving never mixes an edit's expert into a text that does
    not name its subject, so training leaves such rivals out of every row (experts without a relation
    stay) and needs no guard row for a neighbour's question that does not name this edit's subject."""
    from srmoa_dist.experts.expert import ExpertRelation
    from srmoa_dist.ttt.trainer import Guard, TrainingJob

    base, fusion, enc, prompts, qs = world
    spain = diversify(explicit_failure("What is the capital of Spain?", "Rome", correct_answer="Madrid"),
                      "The capital of Spain is Madrid.")
    q_spain = queries(base, enc, [list(p.messages) for p in spain])
    ks, store, ids = _stores(tmp_path, fusion, _random_keys(2))
    about_spain, plain_id = (int(i) for i in ids)
    rng = np.random.default_rng(0)
    [e] = store.get_many([about_spain])
    spanish = ExpertRelation("Spain", _unit(rng.standard_normal((1, 8))))
    store.put_many({about_spain: e.with_relation(spanish)})
    guards = [Guard(about_spain, spain[0], q_spain[0])]

    def job(named_only):
        j = TrainingJob(base, fusion, prompts, qs, ks, store, TTTConfig(steps=2), ks.cfg, ECFG,
                        new_slot=lambda: 50, target=Target(50, True, float("nan")), tau=-1.0, guards=guards,
                        relation=ExpertRelation("France", _unit(rng.standard_normal((1, 8)))),
                        named_only=named_only)
        j.build()
        return j

    def subjects(j, r):
        return sorted(str(getattr(getattr(x, "relation", None), "subject", None)) for x in j.row_rivals[r])

    blind = job(False)
    assert blind.G == 1 and all(subjects(blind, r) == ["None", "Spain"] for r in range(blind.P))
    gated = job(True)
    assert gated.G == 0 and all(subjects(gated, r) == ["None"] for r in range(gated.P))
    store.close()
