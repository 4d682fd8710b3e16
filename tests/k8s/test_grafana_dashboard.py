"""k8s/grafana-dashboard.json: every panel's PromQL names only metrics the code exports (the catalog
of runtime/metrics.py, with Ray's `ray_` prefix and suffixes) and only their labels; every exported
metric has a panel; the README says how to load it."""

from __future__ import annotations

import json
import re

import pytest
from manifest_tools import K8S_DIR

from srmoa_dist.runtime.metrics import CATALOG, EXPORT_PREFIX, exported_names

DASHBOARD = K8S_DIR / "grafana-dashboard.json"
RAY_LABELS = {"ray_io_cluster", "ray_io_group", "le", "instance", "job", "Component", "NodeAddress",
              "SessionName", "Version", "WorkerId"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def _spec_of(series: str):
    for spec in CATALOG.values():
        if series in spec.exported():
            return spec
    return None


def test_every_query_names_an_exported_metric_and_its_labels(dashboard):
    exported = exported_names()
    assert dashboard["panels"], "no panels"
    for title, expr in _exprs(dashboard):
        names = set(re.findall(r"\bray_[a-z0-9_]+", expr)) - {"ray_io_cluster", "ray_io_group"}
        assert names, f"panel {title!r}: {expr!r} names no metric"
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, which the code does not export"
        allowed = RAY_LABELS | {tag for n in names for tag in _spec_of(n).tags}
        labels = {lab.strip() for grp in re.findall(r"\bby \(([^)]*)\)", expr) for lab in grp.split(",")}
        labels |= set(re.findall(r"[{,]\s*([a-zA-Z_]+)\s*(?:=~|!=|=)", expr))
        assert labels <= allowed, f"panel {title!r} uses labels {sorted(labels - allowed)}"
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), title


def test_every_exported_metric_has_a_panel(dashboard):
    queried = " ".join(e for _, e in _exprs(dashboard))
    missing = [s.name for s in CATALOG.values() if not any(n in queried for n in s.exported())]
    assert not missing, f"metrics without a panel: {missing}"


def test_the_dashboard_is_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "cluster"}
    assert dashboard["uid"] and dashboard["title"]
    assert EXPORT_PREFIX == "ray_"


def test_the_readme_says_how_to_load_it():
    readme = (K8S_DIR / "README.md").read_text()
    assert "grafana-dashboard.json" in readme
