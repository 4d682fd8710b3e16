"""`srmoa experts|edits|jobs ...`: manage a running server's experts over its HTTP API.

    srmoa experts list [--namespace N] [--origin edit|import] [--limit L] [--after ID]
    srmoa experts show ID
    srmoa experts import DIR --name NAME --example "..." [--example ...] [--upload] [--namespace N]
    srmoa experts export ID OUT_DIR          # a PEFT adapter directory (PeftModel.from_pretrained);
                                             # a parallel MLP expert: a fitted LoRA on mlp.down_proj
    srmoa experts delete ID
    srmoa edits list | srmoa edits rollback EDIT_ID
    srmoa jobs list

`import` sends the directory's path (the server reads it) unless --upload, which sends the files.
The key is $SRMOA_API_KEY (the admin key for import and delete where one is configured).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import typer

from srmoa_dist.experts.peft_io import CONFIG_NAME, WEIGHTS_NAME

DEFAULT_URL = "http://127.0.0.1:8000"

experts_app = typer.Typer(help="List, import, export and delete experts (PEFT LoRA adapters).",
                          no_args_is_help=True)
edits_app = typer.Typer(help="List and roll back SR-TTT edits.", no_args_is_help=True)
jobs_app = typer.Typer(help="Feedback jobs.", no_args_is_help=True)

URL = typer.Option(DEFAULT_URL, envvar="SRMOA_URL", help="Server URL.")
KEY = typer.Option(None, envvar="SRMOA_API_KEY", help="Bearer key.")


def _call(url: str, key: str | None, method: str, path: str, **kw: Any) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300.0) as c:
        r = c.request(method, path, **kw)
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except Exception:
            msg = r.text[:500]
        typer.echo(f"HTTP {r.status_code}: {msg}", err=True)
        raise typer.Exit(1)
    return r.json()


def _show(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2))


@experts_app.command("list")
def experts_list(
    namespace: str | None = typer.Option(None, help="Only this namespace."),
    origin: str | None = typer.Option(None, help="edit or import."),
    limit: int = typer.Option(100, min=1, max=1000),
    after: int | None = typer.Option(None, help="Page after this expert id."),
    url: str = URL, api_key: str | None = KEY,
) -> None:
    """The catalog: id, name, namespace, origin, examples."""
    params = {k: v for k, v in {"namespace": namespace, "origin": origin, "limit": limit,
                                "after": after}.items() if v is not None}
    page = _call(url, api_key, "GET", "/v1/experts", params=params)
    for e in page["data"]:
        ex = (e["examples"] or [""])[0]
        typer.echo(f"{e['id']:>8}  {e['namespace']:<12} {e['origin']:<7} {e['name'] or '-':<20} {ex[:60]}")
    if page["has_more"]:
        typer.echo(f"... more: --after {page['last_id']}")


@experts_app.command("show")
def experts_show(expert_id: int, url: str = URL, api_key: str | None = KEY) -> None:
    """One expert: record, key, catalog entry."""
    _show(_call(url, api_key, "GET", f"/v1/experts/{expert_id}"))


@experts_app.command("import")
def experts_import(
    adapter_dir: Path = typer.Argument(..., help="A PEFT LoRA adapter directory."),
    name: str = typer.Option(..., help="The adapter's name (model '<base>:<name>')."),
    example: list[str] = typer.Option(..., help="An example prompt (repeat); the key is computed from them."),
    namespace: str | None = typer.Option(None, help="Target namespace (admin only; default: the key's)."),
    upload: bool = typer.Option(False, help="Send the files instead of the server-side path."),
    url: str = URL, api_key: str | None = KEY,
) -> None:
    """Import a PEFT LoRA adapter."""
    body: dict[str, Any] = {"name": name, "examples": list(example)}
    if namespace:
        body["namespace"] = namespace
    if upload:
        body["files"] = {CONFIG_NAME: (adapter_dir / CONFIG_NAME).read_text(),
                         WEIGHTS_NAME: base64.b64encode((adapter_dir / WEIGHTS_NAME).read_bytes()).decode()}
    else:
        body["path"] = str(adapter_dir.resolve())
    e = _call(url, api_key, "POST", "/v1/experts", json=body)
    typer.echo(f"imported {name!r} as expert {e['id']} in namespace {e['namespace']}")


@experts_app.command("export")
def experts_export(expert_id: int, out_dir: Path, url: str = URL, api_key: str | None = KEY) -> None:
    """Write an expert as a PEFT adapter directory (a parallel MLP expert: a fitted, approximate LoRA)."""
    doc = _call(url, api_key, "GET", f"/v1/experts/{expert_id}/adapter")
    write_adapter_files(doc["files"], out_dir)
    typer.echo(f"wrote expert {expert_id} (version {doc['version']}) to {out_dir}")
    rep = doc.get("export") or {}
    if rep and not rep.get("exact", True):
        typer.echo(f"approximate: {rep['method']} (a LoRA on mlp.down_proj fitted to the parallel expert); "
                   f"greedy agreement with the served expert: {_agree(rep.get('own'))} on its own prompts, "
                   f"{_agree(rep.get('held_out'))} on held-out prompts (details in srmoa_export.json)")


def _agree(a: dict[str, Any] | None) -> str:
    if not a:
        return "not measured"
    return f"{a['exact']:.0%} of {a['prompts']} identical ({a['tokens']:.0%} of tokens)"


def write_adapter_files(files: dict[str, str], out_dir: Path) -> Path:
    """The export route's files (the weights base64, the others text) as an adapter directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        if Path(name).name != name:
            raise ValueError(f"files: {name!r} is not a plain file name")
        if name == WEIGHTS_NAME:
            (out_dir / name).write_bytes(base64.b64decode(body))
        else:
            (out_dir / name).write_text(body)
    return out_dir


@experts_app.command("delete")
def experts_delete(expert_id: int, url: str = URL, api_key: str | None = KEY) -> None:
    """Delete an expert (frees its slot; an edit's expert: roll the edit back instead)."""
    _call(url, api_key, "DELETE", f"/v1/experts/{expert_id}")
    typer.echo(f"deleted expert {expert_id}")


@edits_app.command("list")
def edits_list(url: str = URL, api_key: str | None = KEY) -> None:
    """The edit ledger: id, status, expert, rule."""
    for e in _call(url, api_key, "GET", "/v1/edits")["data"]:
        rule = str(e.get("rule") or "")[:70]
        typer.echo(f"{e['edit_id']}  {e['status']:<12} expert {e.get('expert_id')!s:<8} {rule}")


@edits_app.command("rollback")
def edits_rollback(edit_id: str, url: str = URL, api_key: str | None = KEY) -> None:
    """Roll an edit back (its expert's previous version and key)."""
    _show(_call(url, api_key, "DELETE", f"/v1/edits/{edit_id}"))


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(100, min=1, max=1000), url: str = URL,
              api_key: str | None = KEY) -> None:
    """Feedback jobs (the latest `limit`): id, status, edit."""
    for j in _call(url, api_key, "GET", "/v1/feedback", params={"limit": limit})["data"]:
        r = j.get("result") or {}
        typer.echo(f"{j['job_id']}  {j['status']:<8} {r.get('edit_id') or '-':<20} {j.get('error') or ''}")


def register(app: typer.Typer) -> None:
    app.add_typer(experts_app, name="experts")
    app.add_typer(edits_app, name="edits")
    app.add_typer(jobs_app, name="jobs")


__all__ = ["register", "write_adapter_files"]
