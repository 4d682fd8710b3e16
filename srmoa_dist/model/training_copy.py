"""A low-precision copy of the upper layers, for SR-TTT's training steps.

Training runs its forward under `torch.autocast` in bfloat16 (`ttt.train_dtype`). Two costs of doing
that on the model itself, measured per step on the 2-core Xeon (6 rows x 57 tokens, layers 7-29 of
SmolLM2-135M, 0.36 s a step):
- autocast casts a weight to bfloat16 at every call unless the weight needs a gradient, and the base
  model's never do: every step cast the ~110M frozen weights of the layers it runs and of the LM head
  again (a tenth of the step);
- PyTorch's fused CPU attention has a slow bfloat16 backward at these lengths (a fifth of the step);
  the eager attention (two matmuls and a softmax) is not slower forward and far faster backward.
So the steps run on a copy of the layers they run: each Linear's weight and the LM head's in the
compute dtype, cast once; the norms kept as they are (float32), so that the arithmetic is the one
autocast does on the model, but their output cast to the compute dtype once (autocast cast it again for
each Linear that reads it: q, k and v, gate and up); attention eager. On the same rows: 0.21 s a step.

The copy keeps the fusion's forward hooks (`copy.deepcopy` copies each module's hook table, and the
hook functions, which read the routing of the calling thread, are shared), so `fusion.routing(...)`
routes the copy exactly as it routes the model. Eager attention takes an additive mask, not the boolean
one that a model with SDPA attention is given: `causal_mask` builds it. A copy is made once per
(fusion, first layer, dtype) and kept in `fusion.copies` until `fusion.remove()` (~160 MB for
SmolLM2's layers 7-29 in bfloat16). Serving and verification never use it: they run the model itself,
in its dtype and with its attention, so a verified edit is verified as served.

Shape legend: B rows, T tokens, D hidden size, N positions, V vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srmoa_dist.model.fusion import ExpertFusion, decoder_layers


class TrainingCopy:
    """Layers `start..` of a fused model, their Linear weights and the LM head in `dtype`, eager
    attention. Run it with `layers`, `causal_mask` and `head` (see the module docstring)."""

    def __init__(self, fusion: ExpertFusion, start: int, dtype: torch.dtype) -> None:
        model = fusion.model
        layers = decoder_layers(model)
        if not 0 <= start < len(layers):
            raise ValueError(f"start must be a layer of the model (0..{len(layers) - 1}), got {start}")
        self.start, self.dtype = int(start), dtype
        self.layers = copy.deepcopy(layers[start:])            # hooks and config copied with them
        self.layers.requires_grad_(False)
        _cast_linears(self.layers, dtype)
        _cast_norm_outputs(self.layers, dtype)
        self.config = _eager_attention(self.layers, model.config)
        self.norm = model.model.norm                             # float32, as autocast runs it
        head = model.lm_head
        self.head_weight = head.weight.detach().to(dtype)       # (V, D)
        self.head_bias = None if head.bias is None else head.bias.detach().to(dtype)

    def causal_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor) -> Any:
        """The additive mask eager attention takes, for `hidden` (B, T, D) with this padding (B, T)."""
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, then the LM head: (N, D) -> logits (N, V)."""
        return F.linear(self.norm(h), self.head_weight, self.head_bias)


def _cast_linears(layers: nn.Module, dtype: torch.dtype) -> None:
    """Every Linear's weight (and bias) in `dtype`, as frozen parameters."""
    for m in layers.modules():
        if isinstance(m, nn.Linear):
            m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)


def _cast_norm_outputs(layers: nn.ModuleList, dtype: torch.dtype) -> None:
    """Each decoder layer's two norms compute as before, their output cast to `dtype` once."""
    for layer in layers:
        for name in ("input_layernorm", "post_attention_layernorm"):
            if isinstance(getattr(layer, name, None), nn.Module):
                setattr(layer, name, _CastOutput(getattr(layer, name), dtype))


def _eager_attention(layers: nn.Module, config: Any) -> Any:
    """A copy of `config` saying eager attention, given to every module of `layers` that reads one (the
    attention modules read it at each call)."""
    eager = copy.deepcopy(config)
    eager._attn_implementation = "eager"
    for m in layers.modules():
        if hasattr(m, "config"):
            m.config = eager
    return eager


class _CastOutput(nn.Module):
    """A module whose output is cast to `dtype` (the values autocast would give each reader of it)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(self.dtype)


def training_copy(fusion: ExpertFusion, start: int, dtype: torch.dtype) -> TrainingCopy:
    """The fusion's `TrainingCopy` of layers `start..` in `dtype`, made on first use (one thread trains)."""
    key = (int(start), dtype)
    if key not in fusion.copies:
        fusion.copies[key] = TrainingCopy(fusion, start, dtype)
    return fusion.copies[key]
