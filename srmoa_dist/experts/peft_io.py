"""Import and export PEFT LoRA adapters (``adapter_model.safetensors`` + ``adapter_config.json``).

PEFT names a LoRA weight after the module path inside its wrapped model, for example
``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``. The expert's target name is the
part between the wrapper prefix and ``.lora_A`` / ``.lora_B``, without the leading ``model.``:
``layers.3.self_attn.q_proj``. PEFT's ``lora_A.weight`` is (r, d_in) and ``lora_B.weight`` is
(d_out, r), the expert's A and B; PEFT's scaling ``lora_alpha / r`` is the expert's ``alpha / rank``
(rsLoRA's ``lora_alpha / sqrt(r)`` is converted into an equivalent alpha on import).

Only plain LoRA with one rank and one alpha maps onto an expert: DoRA, per-module rank or alpha
patterns, LoRA biases and ``modules_to_save`` are refused with a ValueError. Parallel MLP targets
(``layers.{i}.mlp``) export fine as tensors, but PEFT can only load LoRA on linear modules.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from srmoa_dist.experts.expert import DTYPES, LoRAExpert

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
DEFAULT_PREFIX = "base_model.model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _target_name(module: str) -> str:
    for p in ("base_model.model.", "model."):
        if module.startswith(p):
            module = module[len(p) :]
    return module


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_peft_adapter(path: str | Path, *, dtype: str | None = None) -> LoRAExpert:
    """A PEFT LoRA adapter directory -> LoRAExpert (version 0).

    `dtype` None keeps the file's dtype when it is float16, bfloat16 or float32 (else float32)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(
                f"{p} not found: a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    cfg = json.loads(cfg_path.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(
            f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, only LORA adapters map onto an expert"
        )
    for field in ("use_dora", "lora_bias"):
        if cfg.get(field):
            raise ValueError(f"{cfg_path}: {field}={cfg[field]!r} is not supported (plain LoRA only)")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise ValueError(f"{cfg_path}: {field}={cfg[field]!r}: an expert has a single rank and alpha")
    if cfg.get("modules_to_save"):
        raise ValueError(
            f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r} cannot be stored in an expert"
        )
    r, lora_alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"{cfg_path}: r must be a positive integer, got {r!r}")
    if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
        raise ValueError(f"{cfg_path}: lora_alpha must be positive, got {lora_alpha!r}")
    # rsLoRA scales by lora_alpha / sqrt(r); the expert scales by alpha / r.
    alpha = float(lora_alpha) * math.sqrt(r) if cfg.get("use_rslora") else float(lora_alpha)

    tensors = load_file(str(w_path))
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"{w_path}: tensor {key!r} is not a LoRA A/B weight (only plain LoRA is supported)"
            )
        pairs.setdefault(_target_name(m["module"]), {})[m["ab"]] = t
    if not pairs:
        raise ValueError(f"{w_path} holds no LoRA weights")
    src = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
    dtypes = {src.get(t.dtype, "float32") for ab in pairs.values() for t in ab.values()}
    out_dtype = dtype or (dtypes.pop() if len(dtypes) == 1 else "float32")
    if out_dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {out_dtype!r}")
    targets = {}
    for name in sorted(pairs, key=_natural):
        ab = pairs[name]
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_path}: target {name!r} has lora_{set(ab).pop()} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{w_path}: target {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected (r, d_in) and (d_out, r) with r = {r}"
            )
        targets[name] = (_to_numpy(a, out_dtype), _to_numpy(b, out_dtype))
    return LoRAExpert(targets, alpha)


def _to_numpy(t: Any, dtype: str) -> np.ndarray:
    import torch

    if dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16).copy()
    return t.to(getattr(torch, dtype)).contiguous().numpy().copy()


def save_peft_adapter(
    expert: LoRAExpert,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    task_type: str = "CAUSAL_LM",
) -> Path:
    """Write `expert` as a PEFT LoRA adapter directory loadable by ``PeftModel.from_pretrained``.

    Tensors keep the expert's dtype. ``target_modules`` lists the last component of each target
    name; ``layers_to_transform`` lists the layer indices when every name has one (PEFT adds
    zero-effect LoRA, B = 0, to module/layer pairs the expert does not have)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in expert.to_torch().items():
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    names = list(expert.targets)
    layers = [_LAYER.search(n) for n in names]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": expert.rank,
        "lora_alpha": expert.alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
        "layers_to_transform": sorted({int(m.group(1)) for m in layers}) if all(layers) else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    log.debug("wrote PEFT adapter with %d targets to %s", len(names), path)
    return path
