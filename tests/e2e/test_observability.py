"""Metrics and the key-space page on the session app (tests/e2e/conftest.py), over real HTTP.

One real edit (POST /v1/feedback on the tiny model) and a few requests; then
- the Prometheus metrics scraped from the session cluster's metrics export port moved as they must
  (requests, routed / deferred / base, search and fetch latency, cache hits, edits and their phases,
  feedback jobs, key-store size, energy, consolidations);
- GET /ui in a real headless Chromium (Debian's `chromium`, driven by Playwright): no console
  error, one point per active key, the edit's rule on hover, the latest edits listed; a screenshot
  is saved (tmp dir; also results/ui_keyspace.png with SRMOA_UI_SCREENSHOT=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.ray

FACT = {"prompt": "What is the capital of Zorbania?", "response": "I do not know",
        "correct_answer": "Paris", "rule": "Zorbania's capital is Paris"}
RESULTS = Path(__file__).resolve().parents[2] / "results"


# -- scraping -----------------------------------------------------------------------------------------


def _metrics_url(ray_cluster) -> str:
    node = next(n for n in ray_cluster.nodes() if n.get("Alive"))
    port = node.get("MetricsExportPort")
    assert port, f"the session cluster exports no metrics port: {node}"
    return f"http://{node.get('NodeManagerAddress', '127.0.0.1')}:{port}/metrics"


def _scrape(url: str) -> list[tuple[str, dict, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("ray_srmoa_")]


def _increase(before, after, name: str, **labels) -> float:
    """How much the matching series grew, series by series (a worker that died takes its series
    away; a new worker's series counts from 0)."""
    def series(samples):
        return {tuple(sorted(lab.items())): v for n, lab, v in samples
                if n == name and all(lab.get(k) == v2 for k, v2 in labels.items())}

    old = series(before)
    return sum(max(0.0, v - old.get(key, 0.0)) for key, v in series(after).items())


def _max(samples, name: str, **labels) -> float | None:
    vals = [v for n, lab, v in samples if n == name and all(lab.get(k) == v2 for k, v2 in labels.items())]
    return max(vals) if vals else None


@pytest.fixture(scope="module")
def metrics_url(ray_cluster, app):
    return _metrics_url(ray_cluster)


@pytest.fixture(scope="module")
def baseline(metrics_url):
    return _scrape(metrics_url)


@pytest.fixture(scope="module")
def edited(baseline, url, model_id):
    """One verified edit, asked twice (routed, the second from the expert cache), plus a base-model
    and a deferred answer, an unknown route and a feedback marked correct. Rolled back afterwards."""
    with httpx.Client(base_url=url, timeout=120) as c:
        # earlier tests' live edits on the session app sit near every query of the tiny random model
        # (its queries all look alike) and would be this edit's neighbours: roll them back, latest first
        live = [e for e in c.get("/v1/edits").json()["data"] if e["status"] in ("committed", "verified")]
        for e in sorted(live, key=lambda e: e["created_at"], reverse=True):
            c.delete(f"/v1/edits/{e['edit_id']}")
        job = c.post("/v1/feedback", json=FACT).json()
        t0 = time.monotonic()
        # the session's trainer may still be working through earlier tests' queued edits
        while job["status"] in ("pending", "running") and time.monotonic() - t0 < 400:
            time.sleep(0.5)
            job = c.get(f"/v1/feedback/{job['job_id']}").json()
        assert job["status"] == "done", (job["status"], job.get("error"))
        assert job["result"]["status"] == "verified", job["result"].get("reason")
        ask = {"model": model_id, "max_tokens": 4, "messages": [{"role": "user", "content": FACT["prompt"]}]}
        for _ in range(2):
            r = c.post("/v1/chat/completions", json=ask)
            assert r.status_code == 200 and not r.json()["routing"]["deferred"], r.text
        assert c.post("/v1/chat/completions", json={**ask, "use_experts": False}).status_code == 200
        far = {"model": model_id, "max_tokens": 2, "prompt": "zzz qqq 0123456789 !?", "tau": 0.999}
        r = c.post("/v1/completions", json=far)
        assert r.status_code == 200 and r.json()["routing"]["deferred"], r.text
        assert c.get("/v1/no-such-route").status_code == 404
        assert c.post("/v1/feedback", json={"prompt": "2+2?", "response": "4",
                                            "verdict": "correct"}).json()["status"] == "skipped"
        yield job["result"]
        c.delete(f"/v1/edits/{job['result']['edit_id']}")


def test_metrics_moved_after_real_requests(metrics_url, baseline, edited, http, app):
    b = baseline
    store = app[1].runtime.namespace

    def moved(name: str, by: float = 1, **labels):
        return lambda s: _increase(b, s, name, **labels) >= by

    chat = "/v1/chat/completions"
    checks = {
        "chat requests by route and status": moved("ray_srmoa_requests_total", 3, route=chat, status="200"),
        "an unknown route: a 404 of 'unmatched'": moved("ray_srmoa_requests_total", route="unmatched",
                                                        status="404"),
        "request latency": moved("ray_srmoa_request_seconds_count", route=chat),
        "routed": moved("ray_srmoa_routing_total", 2, outcome="routed", namespace="default"),
        "deferred": moved("ray_srmoa_routing_total", outcome="deferred", namespace="default"),
        "base (use_experts false)": moved("ray_srmoa_routing_total", outcome="base", namespace="default"),
        "search round trip": moved("ray_srmoa_search_seconds_count"),
        "search inside the key store": moved("ray_srmoa_keystore_search_seconds_count", store=store),
        "expert fetch": moved("ray_srmoa_expert_fetch_seconds_count"),
        "a cache hit (the second ask)": moved("ray_srmoa_expert_cache_lookups_total", result="hit"),
        "cache hit rate gauge": lambda s: (_max(s, "ray_srmoa_expert_cache_hit_rate") or 0) > 0,
        "a verified edit": moved("ray_srmoa_edits_total", status="verified", namespace="default"),
        **{f"edit phase {p}": moved("ray_srmoa_edit_phase_seconds_count", phase=p)
           for p in ("reflect", "train", "commit", "verify", "total")},
        "a feedback job done": moved("ray_srmoa_feedback_jobs_total", status="done"),
        "a feedback job skipped": moved("ray_srmoa_feedback_jobs_total", status="skipped"),
        "consolidations": moved("ray_srmoa_consolidations_total", store=store),
        "key-store energy gauge": lambda s: _max(s, "ray_srmoa_keystore_energy", store=store) is not None,
    }
    deadline, failing, samples = time.monotonic() + 45, list(checks), []
    while time.monotonic() < deadline:
        samples = _scrape(metrics_url)
        failing = [name for name, ok in checks.items() if not ok(samples)]
        if not failing:
            break
        time.sleep(1.0)
    assert not failing, f"metrics that did not move: {failing}"
    n_active = http.get("/v1/stats").json()["keystore"]["n_active"]
    deadline = time.monotonic() + 15                            # the size gauge follows within seconds
    while time.monotonic() < deadline and _max(samples, "ray_srmoa_keystore_keys", state="active",
                                               store=store) != n_active:
        time.sleep(1.0)
        samples = _scrape(metrics_url)
    assert _max(samples, "ray_srmoa_keystore_keys", state="active", store=store) == n_active


# -- the key-space page ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and allowed (root), else a skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"],
                       capture_output=True, timeout=900, check=False)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium: install Debian's package (apt-get install -y chromium, as "
                    "scripts/setup.sh does when run as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[dev]'")
    return path


def test_keyspace_route_validates_its_limit(http):
    r = http.get("/v1/keyspace", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_the_ui_page_in_headless_chromium(chromium, edited, app, ray_cluster, url, http, tmp_path):
    from playwright.sync_api import sync_playwright

    _, cfg, rt = app
    rng = np.random.default_rng(7)
    extra = rng.standard_normal((4, cfg.keystore.d_key)).astype(np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    seeded = ray_cluster.get(rt.keystore.add.remote(extra, True, None, "team-b")).tolist()
    try:
        ks = http.get("/v1/keyspace").json()
        n_active = http.get("/v1/stats").json()["keystore"]["n_active"]
        assert ks["n_active"] == ks["n_shown"] == n_active == len(ks["points"])
        assert set(ks["namespaces"]) >= {"default", "team-b"}
        errors: list[str] = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 760})
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{url}/ui?poll_ms=500")
                page.wait_for_selector("body[data-loaded='1']", timeout=30_000)
                assert page.locator("#map circle.key").count() == n_active
                assert page.get_attribute("#map", "data-points") == str(n_active)
                page.hover(f"#map circle.key[data-id='{edited['expert_id']}']")
                tip = page.inner_text("#tip")
                assert FACT["rule"] in tip or FACT["prompt"] in tip, tip
                assert "verified" in page.inner_text("#edits")
                time.sleep(1.2)                                   # two polls: still no error
                shot = tmp_path / "ui_keyspace.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
        assert not errors, errors
        assert shot.stat().st_size > 5000
        if os.environ.get("SRMOA_UI_SCREENSHOT"):
            RESULTS.mkdir(exist_ok=True)
            shutil.copy(shot, RESULTS / "ui_keyspace.png")
    finally:
        ray_cluster.get(rt.keystore.free.remote(seeded))
