"""`srmoa demo`: teach the served model an invented fact through feedback, while it serves.

1. local Ray + the Serve app on 127.0.0.1, a store under the data directory, the default SmolLM2;
2. ask a question about an invented fact (the model cannot know it) and an unrelated question;
3. send feedback (the correct answer and the rule); the trainer actor runs SR-TTT;
4. ask again, ask a paraphrase, ask the unrelated question again; show before/after and the routing.

Success (exit 0) = the edit was verified, the question is now answered right and the unrelated answer
is unchanged. The paraphrase is reported (it is the harder, held-out case) but does not decide.
"""

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

FACT = {
    "question": "What is the capital of Veloria?",
    "paraphrase": "Which city is the capital of Veloria?",
    "answer": "Quenmoor",
    "rule": "The capital of the country Veloria is the city of Quenmoor.",
    "unrelated": "What is the capital of France?",
}
DEMO_MARKER = ".srmoa-demo"
STORE_PARTS = ("shards", "keystore", "ledger", "jobs", "config.yaml", "query_encoder.npz")


def _contains(text: str, answer: str) -> bool:
    return answer.lower() in text.lower()


def _routing(r: dict[str, Any] | None) -> str:
    if not r or r.get("deferred"):
        return "base model (no expert above tau)"
    return ", ".join(f"expert {i} (score {s:.2f})" for i, s in zip(r["expert_ids"], r["scores"]))


def run_demo(data_dir: Path, model: str = "smollm2", fresh: bool = True, port: int = 0,
             say: Callable[[str], None] = print, verbose: bool = False, max_tokens: int = 32) -> bool:
    """Run the demo; True when the edit worked (see the module docstring)."""
    import dataclasses

    from srmoa_dist.runtime.store_init import load_config
    from srmoa_dist.serve import local

    data_dir = Path(data_dir)
    marker = data_dir / DEMO_MARKER
    if fresh:
        if any((data_dir / p).exists() for p in STORE_PARTS) and not marker.exists():
            say(f"{data_dir} holds a store the demo did not make; refusing to wipe it "
                "(use another --data-dir, or --no-fresh to reuse it)")
            return False
        for part in STORE_PARTS:
            p = data_dir / part
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `srmoa demo`; --fresh wipes this store (the model cache stays)\n")
    cfg = load_config(data_dir)
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, name_or_path=model))
    t0 = time.monotonic()
    app = local.start(cfg, host="127.0.0.1", port=port, say=say, log_to_driver=verbose)
    say(f"server ready at {app.url} after {time.monotonic() - t0:.0f} s")
    try:
        with httpx.Client(base_url=app.url, timeout=600) as c:
            return _script(c, cfg.serve.model_id, say, max_tokens)
    finally:
        say("stopping the server and the local Ray cluster ...")
        local.stop(app)


def _script(c: httpx.Client, model_id: str, say: Callable[[str], None], max_tokens: int) -> bool:
    def ask(q: str) -> tuple[str, dict[str, Any]]:
        r = c.post("/v1/chat/completions", json={"model": model_id, "max_tokens": max_tokens,
                                                  "messages": [{"role": "user", "content": q}]})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["message"]["content"].strip(), body["routing"]

    q, para, ans, unrel = FACT["question"], FACT["paraphrase"], FACT["answer"], FACT["unrelated"]
    say(f"asking: {q!r}")
    before, r_before = ask(q)
    say(f"  before: {before!r}  [{_routing(r_before)}]")
    if _contains(before, ans):
        say("the model already answers this; nothing to teach (is the store fresh?)")
        return False
    un_before, _ = ask(unrel)
    say(f"unrelated: {unrel!r}\n  before: {un_before!r}")

    say(f"sending feedback: the answer is {ans!r} (rule: {FACT['rule']!r}); the trainer starts an edit")
    job = c.post("/v1/feedback", json={"prompt": q, "response": before, "correct_answer": ans,
                                        "rule": FACT["rule"]}).json()
    job_id = job["job_id"]
    t0 = time.monotonic()
    last = None
    while True:
        job = c.get(f"/v1/feedback/{job_id}", params={"wait": 5}).json()   # returns when it finishes
        if job["status"] != last:
            say(f"  job {job_id}: {job['status']} ({time.monotonic() - t0:.0f} s)")
            last = job["status"]
        if job["status"] not in ("pending", "running"):
            break
        if time.monotonic() - t0 > 900:
            say("  the edit did not finish in 15 minutes")
            return False
    if job["status"] != "done":
        say(f"  the job failed: {job.get('error')}")
        return False
    res = job["result"] or {}
    losses = res.get("lm_losses") or [float("nan")]
    say(f"  edit {res.get('edit_id')}: {res.get('status')}, expert {res.get('expert_id')}, "
        f"{res.get('steps')} steps, LM loss {losses[0]:.2f} -> {losses[-1]:.2f}"
        + (f" ({res.get('reason')})" if res.get("reason") else ""))

    after, r_after = ask(q)
    para_after, r_para = ask(para)
    un_after, r_un = ask(unrel)
    ok_q = _contains(after, ans)
    ok_para = _contains(para_after, ans)
    ok_un = un_after == un_before
    verified = res.get("status") == "verified"
    lines = [
        "",
        f"question    {q!r}",
        f"  before    {before!r}",
        f"  after     {after!r}   [{_routing(r_after)}]   {'RIGHT' if ok_q else 'WRONG'}",
        f"paraphrase  {para!r}",
        f"  after     {para_after!r}   [{_routing(r_para)}]   {'RIGHT' if ok_para else 'WRONG'}",
        f"unrelated   {unrel!r}",
        f"  before    {un_before!r}",
        f"  after     {un_after!r}   [{_routing(r_un)}]   {'UNCHANGED' if ok_un else 'CHANGED'}",
        "",
    ]
    for line in lines:
        say(line)
    mirror = (c.get("/v1/stats").json().get("server") or {}).get("edited_relations")
    if mirror is not None:          # the relation gate's view of the store's edits, on the model server
        say(f"relation gate: {mirror['experts']} edited relation(s) mirrored on the model server")
    ok = verified and ok_q and ok_un
    say("the edit worked" if ok else "the edit did NOT work")
    return ok


__all__ = ["run_demo", "FACT"]
