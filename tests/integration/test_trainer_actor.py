"""TrainerActor: feedback jobs from a queue on the tiny model; a job whose trainer dies is failed."""

from __future__ import annotations

import time

import pytest
from itest_support import TINY_MODEL, TINY_TTT, small_config

from srmoa_dist.runtime.bootstrap import ensure_actors

pytestmark = pytest.mark.ray

FEEDBACK = {"prompt": "What is the capital of France?", "response": "Lyon", "correct_answer": "Paris",
            "verdict": "wrong"}


def _runtime(tmp_path, tiny_model_dir, **ttt):
    cfg = small_config(tmp_path / "data", model={"name_or_path": str(tiny_model_dir), **TINY_MODEL},
                       ttt={**TINY_TTT, **ttt})
    return ensure_actors(cfg, trainer=True)


def _poll(ray, trainer, job_id, until, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            job = ray.get(trainer.job.remote(job_id), timeout=10)
        except Exception:
            job = None                    # restarting
        if job is not None and until(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the expected state")


def _pinned_slots(ray, keystore) -> list[int]:
    ids = ray.get(keystore.call.remote("active_ids"))
    if not len(ids):
        return []
    return [int(i) for i, p in zip(ids, ray.get(keystore.call.remote("is_pinned", ids))) if p]


def test_restart_settles_an_edit_that_died_mid_commit(ray_cluster, tmp_path, tiny_model_dir):
    """What a trainer killed between `pin` and the ledger's commit leaves on disk (the intent, the new
    expert, its pinned key), plus a slot reserved just before a crash: the next trainer's recovery
    undoes the edit, frees both slots, and the job says the edit was not applied. A second job whose
    edit was verified just before the crash (its job record still says running) is done, with it."""
    import json

    import numpy as np

    from srmoa_dist.experts.expert import LoRAExpert
    from srmoa_dist.runtime.client import ExpertStoreClient
    from srmoa_dist.runtime.store_init import jobs_dir
    from srmoa_dist.ttt.ledger import EditLedger, EditRecord

    cfg = small_config(tmp_path / "data", model={"name_or_path": str(tiny_model_dir), **TINY_MODEL},
                       ttt=TINY_TTT)
    rt = ensure_actors(cfg, trainer=False)
    try:
        keys = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
        key = keys[:1]
        [eid, kept] = ray_cluster.get(rt.keystore.add.remote(keys, True)).tolist()
        [leaked] = ray_cluster.get(rt.keystore.add.remote(np.zeros((1, 16), np.float32), True)).tolist()
        client = ExpertStoreClient(rt.shards, keystore=rt.keystore)
        client.put_many({i: LoRAExpert.random({"q": (64, 64)}, 4, 8.0, "float16", seed=i)
                         for i in (eid, kept)})
        ledger = EditLedger(cfg.ledger_dir)
        ledger.commit(EditRecord(
            edit_id="edit-y", status="committed", rule="r", prompts=(), expert_id=kept, created=True,
            prev_version=None, new_version=1, new_key=keys[1], prev_pinned=True, extra={"job_id": "job-y"}))
        ledger.set_status("edit-y", "verified", note="verified")
        ledger.intent(EditRecord(
            edit_id="edit-x", status="intent", rule="r", prompts=(), expert_id=eid, created=True,
            prev_version=None, new_version=1, new_key=key[0], prev_pinned=True, question=FEEDBACK["prompt"],
            extra={"job_id": "job-x", "stage": "committing"}))
        jobs = jobs_dir(cfg)
        jobs.mkdir(parents=True, exist_ok=True)
        for job_id in ("job-x", "job-y"):
            (jobs / f"{job_id}.json").write_text(json.dumps({
                "job_id": job_id, "object": "feedback.job", "status": "running", "created": time.time(),
                "started": time.time(), "finished": None, "error": None, "result": None, "attempt": 1,
                "request": FEEDBACK}))
        rt = ensure_actors(cfg, trainer=True)           # the restarted trainer, over the same store
        t = rt.trainer
        job = _poll(ray_cluster, t, "job-x", lambda j: j["status"] != "running", timeout=60)
        assert job["status"] == "failed" and "edit-x is failed" in job["error"], job
        assert "not applied" in job["error"] and job["result"]["recovered"]
        done = ray_cluster.get(t.job.remote("job-y"))
        assert done["status"] == "done" and done["result"]["status"] == "verified" and not done["error"]
        e = {e["edit_id"]: e for e in ray_cluster.get(t.list_edits.remote())}
        assert e["edit-x"]["status"] == "failed" and "recovered after a crash" in e["edit-x"]["notes"][-1]
        assert e["edit-y"]["status"] == "verified"
        assert ray_cluster.get(rt.keystore.key_info.remote([eid, leaked])) == [None, None]
        assert client.contains([eid, kept]) == [False, True]
        assert _pinned_slots(ray_cluster, rt.keystore) == [kept]
        rec = ray_cluster.get(t.stats.remote())["recovery"]
        assert rec["undone"] == ["edit-x"] and rec["freed_slots"] == [leaked]
    finally:
        rt.kill_actors()


def test_job_lifecycle_edit_and_rollback(ray_cluster, tmp_path, tiny_model_dir):
    rt = _runtime(tmp_path, tiny_model_dir)
    try:
        t = rt.trainer
        job = ray_cluster.get(t.submit.remote(FEEDBACK))
        assert job["status"] == "pending" and job["job_id"].startswith("job-")
        done = ray_cluster.get(t.wait.remote(job["job_id"], 120.0))
        assert done["status"] == "done", done
        res = done["result"]
        assert res["status"] == "verified", res
        assert res["answer_ok"] and res["expert_id"] in res["routed_to"]
        skipped = ray_cluster.get(t.submit.remote({**FEEDBACK, "verdict": "correct"}))
        assert skipped["status"] == "skipped"
        edits = ray_cluster.get(t.list_edits.remote())
        assert [e["edit_id"] for e in edits] == [res["edit_id"]] and edits[0]["status"] == "verified"
        out = ray_cluster.get(t.rollback.remote(res["edit_id"]))
        assert out["status"] == "rolled_back"
        again = ray_cluster.get(t.rollback.remote(res["edit_id"]))
        assert again["error"]["status"] == 409
        assert ray_cluster.get(t.rollback.remote("edit-nope"))["error"]["status"] == 404
        # the created expert's key slot is free again: nothing routes there
        assert ray_cluster.get(rt.keystore.key_info.remote([res["expert_id"]])) == [None]
        st = ray_cluster.get(t.stats.remote())
        assert st["jobs"] == {"done": 1, "skipped": 1} and st["model_loaded"]
        from srmoa_dist.runtime.torch_env import torch_threads

        # started with OpenMP at its torch threads, not Ray's 1 for a fractional-CPU actor
        assert st["omp_num_threads"] == str(torch_threads(rt.cfg))
        assert st["malloc_arena_max"] == str(rt.cfg.runtime.malloc_arenas)   # see runtime/torch_env.py
    finally:
        rt.kill_actors()


def test_job_of_a_dead_trainer_is_failed_not_pending(ray_cluster, tmp_path, tiny_model_dir):
    rt = _runtime(tmp_path, tiny_model_dir, steps=100_000, converge_loss=0.0)      # trains for minutes
    try:
        t = rt.trainer
        job = ray_cluster.get(t.submit.remote(FEEDBACK))
        _poll(ray_cluster, t, job["job_id"], lambda j: j["status"] == "running")
        # queued behind the running batch (jobs queued before a batch forms would train in it)
        queued = ray_cluster.get(t.submit.remote({**FEEDBACK, "correct_answer": "Paris, France"}))
        time.sleep(1.0)
        ray_cluster.kill(t, no_restart=False)             # the trainer process dies mid-job
        failed = _poll(ray_cluster, t, job["job_id"], lambda j: j["status"] == "failed", timeout=60)
        assert "trainer stopped" in failed["error"] and "not applied" in failed["error"]
        st = ray_cluster.get(t.stats.remote())
        assert st["recovered"] and st["recovery"] is not None
        assert _pinned_slots(ray_cluster, rt.keystore) == []     # the edit's reserved slot did not leak
        assert all(e["status"] not in ("intent", "committed", "rolling_back")
                   for e in ray_cluster.get(t.list_edits.remote()))
        # the job queued behind it was not lost: it is pending or running again after the restart
        again = _poll(ray_cluster, t, queued["job_id"], lambda j: j["status"] in ("pending", "running"))
        assert again["status"] in ("pending", "running")
    finally:
        rt.kill_actors()


def test_queued_jobs_are_trained_together_and_each_settles_on_its_own(ray_cluster, tmp_path, tiny_model_dir):
    rt = _runtime(tmp_path, tiny_model_dir, batch_edits=4)
    try:
        t = rt.trainer
        ray_cluster.get(t.wait.remote(ray_cluster.get(t.submit.remote(FEEDBACK))["job_id"], 120.0))  # loads
        facts = [("What is the capital of Italy?", "Rome"), ("Who wrote Hamlet?", "Shakespeare"),
                 ("What do bees make?", "Honey")]
        jobs = [ray_cluster.get(t.submit.remote({"prompt": q, "correct_answer": a})) for q, a in facts]
        done = [ray_cluster.get(t.wait.remote(j["job_id"], 180.0)) for j in jobs]
        assert all(d["status"] == "done" for d in done), done
        sizes = [d["result"]["batch_size"] for d in done]
        assert max(sizes) > 1, sizes                      # queued jobs shared a training batch
        live = [d["result"]["expert_id"] for d in done if d["result"]["status"] == "verified"]
        assert len(live) == len(set(live))                # each verified edit holds its own expert
        for d in done:
            assert d["result"]["status"] in ("verified", "rolled_back")
            assert "train_s" in d["result"]["timings"]
    finally:
        rt.kill_actors()


def test_consolidation_moves_keys_while_an_edit_trains(ray_cluster, tmp_path, tiny_model_dir):
    """Gravity goes on during an edit: an unrelated key moves under served activations while the
    edit's candidate keys are held bit-identical."""
    import numpy as np

    rt = _runtime(tmp_path, tiny_model_dir, steps=100_000, converge_loss=0.0)      # trains for minutes
    try:
        ks, t = rt.keystore, rt.trainer
        rng = np.random.default_rng(0)
        x = rng.standard_normal((40, 16)).astype(np.float32)
        ids = ray_cluster.get(ks.add.remote(x / np.linalg.norm(x, axis=1, keepdims=True), False)).tolist()
        job = ray_cluster.get(t.submit.remote(FEEDBACK))
        _poll(ray_cluster, t, job["job_id"], lambda j: j["status"] == "running")
        t0 = time.monotonic()
        held: list[int] = []
        while not held and time.monotonic() - t0 < 120:
            held = [int(i) for i in ray_cluster.get(ks.call.remote("held_ids"))]
            time.sleep(0.2)
        assert held, ("the edit never held its candidates keys", ray_cluster.get(t.job.remote(job["job_id"])))
        free = next(i for i in ids if i not in held)
        before = ray_cluster.get(ks.get.remote([free, *held]))
        q = rng.standard_normal((1, 16)).astype(np.float32)
        q /= np.linalg.norm(q)
        for _ in range(3):
            g = np.array([[0.5, 0.5]], np.float32)
            ray_cluster.get(ks.record.remote(q, np.array([[free, held[0]]]), g))
            ray_cluster.get(ks.flush.remote())
        after = ray_cluster.get(ks.get.remote([free, *held]))
        assert ray_cluster.get(t.job.remote(job["job_id"]))["status"] == "running"   # still training
        assert not np.allclose(after[0], before[0])                    # gravity moved the unrelated key
        np.testing.assert_array_equal(after[1:], before[1:])            # the held candidates did not move
    finally:
        rt.kill_actors()
