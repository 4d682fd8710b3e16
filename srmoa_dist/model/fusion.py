"""Routed LoRA fusion: per-sequence experts applied inside one batched forward.

Two forms (`ExpertConfig.form`):

- ``parallel_mlp`` (default, SOME's expert): a parallel adapter on the MLP block of every adapted
  layer, target name ``"layers.{i}.mlp"``, ``y = mlp(x) + sum_k g_k * s_k * B_k A_k x``;
- ``lora``: LoRA on named linears (``ExpertConfig.target_modules``), target names such as
  ``"layers.{i}.self_attn.q_proj"`` or ``"layers.{i}.mlp.down_proj"``, ``y = W x + sum_k g_k s_k B_k A_k x``
  (PEFT's ``lora_A`` is our A, its ``lora_B`` our B).

Adapted layers are ``first_layer .. last_layer`` (inclusive; default ``query_layer + 1 .. last``), so
the hidden states of layer Lq that make the routing query are never touched by an expert.

The adapters are forward hooks on the targeted modules: the module tree and the state dict of the
base model are unchanged, the hooks do nothing outside a `routing` context, and a plain
``model(input_ids)`` under `routing(...)` runs the routed model (the TTT trainer relies on that).
The routing state is thread-local, so threads sharing one model do not see each other's routing.

Shape legend (einsum letters):
    b  sequences in the batch that have at least one expert (rows of the batch)
    t  tokens (T; 1 while decoding with the KV cache)
    d  input dim of the adapted module (d_in)
    o  output dim of the adapted module (d_out)
    k  experts per sequence (K, padded with zero gates)
    r  rank (R, the largest rank in the batch; smaller ranks are zero-padded, which is exact)

    h     = einsum("btd,bkrd->btkr", x, A)          # into each expert's rank space
    delta = einsum("btkr,bkor,bk->bto", h, B, g)    # back out, weighted by the gates
    y     = f(x) + delta                             # only for the routed rows; others are untouched

The hooks compute exactly this as two batched matmuls over the experts' concatenated rank spaces
(``kr`` = K*R): ``At = A`` as (b, d, kr) and ``Bg = g * B`` as (b, kr, o), built once per `routing`
call, then ``h = bmm(x, At)`` and ``y = baddbmm(f(x), h, Bg)``: two kernels a module per decode
step instead of two einsums (a decode step runs them in every adapted layer, so dispatch cost counts).
The scaling ``s_k = alpha_k / rank_k`` is folded into the gates, and the gates into B, once per
`routing` call. A sequence with no expert gets exactly the base output: its row is not touched
(``torch.index_add`` on the routed rows only), so logits compare equal with ``torch.equal``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from torch import nn

from srmoa_dist.config import ExpertConfig

if TYPE_CHECKING:
    from srmoa_dist.experts.expert import LoRAExpert

log = logging.getLogger(__name__)

ExpertLike = Union["LoRAExpert", "TrainableExpert"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.model.layers`` for Llama-like models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        layers = getattr(get_decoder(), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(
        f"{type(model).__name__} has no decoder layers at model.model.layers (Llama-like models only)"
    )


class TrainableExpert(nn.Module):
    """One expert as trainable parameters, used under `ExpertFusion.routing` with gate 1.

    ``A[name]`` is (r, d_in), ``B[name]`` is (d_out, r), both float32 ``nn.Parameter`` with
    ``requires_grad=True`` on the model's device. ``to_expert()`` gives the `LoRAExpert` back.
    """

    def __init__(
        self,
        names: Sequence[str],
        As: Sequence[torch.Tensor],
        Bs: Sequence[torch.Tensor],
        alpha: float,
        version: int = 0,
        dtype: str = "float16",
    ) -> None:
        super().__init__()
        self.names: tuple[str, ...] = tuple(names)
        self.alpha = float(alpha)
        self.version = int(version)
        self.storage_dtype = dtype
        self.A = nn.ParameterDict({_key(n): nn.Parameter(a) for n, a in zip(self.names, As)})
        self.B = nn.ParameterDict({_key(n): nn.Parameter(b) for n, b in zip(self.names, Bs)})

    @property
    def rank(self) -> int:
        return int(next(iter(self.A.values())).shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (r, d_in), B (d_out, r)) of one target, or None if this expert does not adapt it."""
        k = _key(name)
        if k not in self.A:
            return None
        return self.A[k], self.B[k]

    def to_expert(self, dtype: str | None = None) -> LoRAExpert:
        """A frozen `LoRAExpert` (numpy, storage dtype) with the current values and the same version."""
        from srmoa_dist.experts.expert import LoRAExpert

        targets = {n: (self.A[_key(n)].detach(), self.B[_key(n)].detach()) for n in self.names}
        return LoRAExpert.from_float(targets, self.alpha, dtype or self.storage_dtype, self.version)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


@dataclass
class _Site:
    """The routed tensors of one target for the current batch."""

    rows: torch.Tensor | None  # (b,) long: rows of the batch with an expert; None = every row
    At: torch.Tensor  # (b, d_in, K*R)   A of every expert of a row, side by side
    Bg: torch.Tensor  # (b, K*R, d_out)  B times the gate (scaling folded in; zero for padding slots)


@dataclass
class PreparedRouting:
    """The stacked tensors of one batch's routing (built by `ExpertFusion.prepare`)."""

    batch_size: int
    sites: dict[str, _Site]


class ExpertFusion:
    """Installs routed adapters into the layers above ``query_layer`` of an HF causal LM."""

    def __init__(self, model: nn.Module, cfg: ExpertConfig, query_layer: int) -> None:
        self.model = model
        self.cfg = cfg
        self.query_layer = int(query_layer)
        layers = decoder_layers(model)
        n_layers = len(layers)
        first = cfg.first_layer if cfg.first_layer is not None else self.query_layer + 1
        last = cfg.last_layer if cfg.last_layer is not None else n_layers - 1
        if first <= self.query_layer:
            raise ValueError(
                f"expert.first_layer ({first}) must be above the query layer ({self.query_layer})"
            )
        if not first <= last < n_layers:
            raise ValueError(
                f"adapted layers {first}..{last} do not fit the model's {n_layers} layers "
                f"(query layer {self.query_layer})"
            )
        self.first_layer, self.last_layer = first, last
        self._modules: dict[str, nn.Module] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        for i in range(first, last + 1):
            layer = layers[i]
            if cfg.form == "parallel_mlp":
                mlp = getattr(layer, "mlp", None)
                if mlp is None:
                    raise TypeError(f"layer {i} ({type(layer).__name__}) has no .mlp to adapt")
                d = _hidden_size(model)
                self._add(f"layers.{i}.mlp", mlp, d, d)
            else:
                named = dict(layer.named_modules())
                for m in cfg.target_modules:
                    hits = [
                        n
                        for n, mod in named.items()
                        if (n == m or n.endswith("." + m)) and isinstance(mod, nn.Linear)
                    ]
                    if len(hits) != 1:
                        raise ValueError(f"target module {m!r} matches {hits or 'no'} linear(s) in layer {i}")
                    lin = named[hits[0]]
                    self._add(f"layers.{i}.{hits[0]}", lin, lin.in_features, lin.out_features)
        self._local = threading.local()
        # copies of the fused layers that carry these hooks (`model.training_copy`), dropped by `remove`
        self.copies: dict[tuple[int, torch.dtype], object] = {}
        self._handles = [
            mod.register_forward_hook(self._make_hook(name)) for name, mod in self._modules.items()
        ]
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        log.info(
            "fusion: %s adapters on %d targets, layers %d..%d", cfg.form, len(self._modules), first, last
        )

    # ------------------------------------------------------------------ API
    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """Target name -> (d_in, d_out), the shapes `LoRAExpert.random` takes."""
        return dict(self._shapes)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._shapes)

    def remove(self) -> None:
        """Uninstall the hooks (the model is the plain base model again) and drop the copies."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.copies.clear()

    @property
    def active(self) -> bool:
        """True inside a `routing` context (of this thread)."""
        return getattr(self._local, "state", None) is not None

    @contextmanager
    def routing(
        self,
        experts: Sequence[Sequence[ExpertLike]],
        gates: torch.Tensor | np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> Iterator[None]:
        """Route sequence b of the next forwards to ``experts[b]`` with gates ``gates[b, :len(experts[b])]``.

        experts: one list per sequence of the batch (an empty list = exactly the base model);
                 `LoRAExpert` (numpy, converted once here) or `TrainableExpert` (differentiable).
        gates:   (B, K) with K >= the longest list; None = 1 for every expert. Gradients flow
                 through a gates tensor that requires grad. Extra columns are ignored.
        Every forward inside the context must have batch size B. Contexts nest (the inner wins).
        """
        with self.activate(self.prepare(experts, gates)):
            yield

    def prepare(
        self,
        experts: Sequence[Sequence[ExpertLike]],
        gates: torch.Tensor | np.ndarray | Sequence[Sequence[float]] | None = None,
    ) -> PreparedRouting:
        """Gather and stack the experts once (see `routing`); `activate` it around each forward."""
        return self._build_state(experts, gates)

    @contextmanager
    def activate(self, prepared: PreparedRouting) -> Iterator[None]:
        """Make a prepared routing current for this thread (for loops that must not hold a context
        across a `yield`, such as the decoding loop of a streamed generation)."""
        prev = getattr(self._local, "state", None)
        self._local.state = prepared
        try:
            yield
        finally:
            self._local.state = prev

    def trainable(self, expert: LoRAExpert) -> TrainableExpert:
        """Trainable float32 copies of one expert's A and B (requires_grad) on the model's device.

        Use it as ``with fusion.routing([[te]] * B): loss = lm_loss(model(...))``: gradients reach
        only ``te``'s parameters (the base model is frozen).
        """
        self._check_targets(expert)
        f32 = expert.float32()
        names = [n for n in self._shapes if n in f32]
        As = [torch.tensor(f32[n][0], device=self.device) for n in names]
        Bs = [torch.tensor(f32[n][1], device=self.device) for n in names]
        return TrainableExpert(names, As, Bs, alpha=expert.alpha, version=expert.version, dtype=expert.dtype)

    # ------------------------------------------------------------- internals
    def _add(self, name: str, module: nn.Module, d_in: int, d_out: int) -> None:
        self._modules[name] = module
        self._shapes[name] = (d_in, d_out)

    def _check_targets(self, expert: ExpertLike) -> None:
        names = expert.names if isinstance(expert, TrainableExpert) else tuple(expert.targets)
        unknown = [n for n in names if n not in self._shapes]
        if unknown:
            raise ValueError(
                f"expert adapts {unknown[:4]}{'...' if len(unknown) > 4 else ''}, not installed here "
                f"(form {self.cfg.form!r}, layers {self.first_layer}..{self.last_layer})"
            )

    def _tensors(self, expert: ExpertLike) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (A (r, d_in), B (d_out, r)) in the model's dtype and device (unscaled)."""
        if isinstance(expert, TrainableExpert):
            return {
                n: (a.to(self.dtype), b.to(self.dtype)) for n in expert.names for a, b in [expert.pair(n)]
            }
        out = expert.to_torch(device=self.device, dtype=self.dtype)  # handles bfloat16 bits
        for name, (a, b) in out.items():
            d_in, d_out = self._shapes[name]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ValueError(
                    f"expert target {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"(d_in, d_out) = {(d_in, d_out)}"
                )
        return out

    def _build_state(
        self,
        experts: Sequence[Sequence[ExpertLike]],
        gates: torch.Tensor | np.ndarray | Sequence[Sequence[float]] | None,
    ) -> PreparedRouting:
        n_seq = len(experts)
        K = max((len(e) for e in experts), default=0)
        if gates is None:
            g_all = torch.ones(n_seq, max(K, 1), device=self.device, dtype=self.dtype)
        else:
            g_all = (
                gates
                if isinstance(gates, torch.Tensor)
                else torch.as_tensor(np.asarray(gates, dtype=np.float32))
            )
            g_all = g_all.to(self.device, self.dtype)
            if g_all.dim() != 2 or g_all.shape[0] != n_seq or (K and g_all.shape[1] < K):
                raise ValueError(f"gates must be (B={n_seq}, K>={K}), got {tuple(g_all.shape)}")
        for seq in experts:
            for e in seq:
                self._check_targets(e)
        routed = [b for b, seq in enumerate(experts) if len(seq) > 0]
        sites: dict[str, _Site] = {}
        if not routed:
            return PreparedRouting(n_seq, sites)
        rows = None if len(routed) == n_seq else torch.tensor(routed, device=self.device, dtype=torch.long)
        # scaling folded into the gates: g_eff[b, k] = g[b, k] * alpha_k / rank_k, zero for padding
        scale = torch.zeros(len(routed), K, device=self.device, dtype=self.dtype)
        for j, b in enumerate(routed):
            for k, e in enumerate(experts[b]):
                scale[j, k] = float(e.scaling)
        g = g_all[routed, :K] * scale  # (b, K)
        conv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for b in routed:
            for e in experts[b]:
                if id(e) not in conv:
                    conv[id(e)] = self._tensors(e)
        for name, (d_in, d_out) in self._shapes.items():
            pairs = [[conv[id(e)].get(name) for e in experts[b]] for b in routed]
            ranks = [p[0].shape[0] for seq in pairs for p in seq if p is not None]
            if not ranks:
                continue  # no expert of the batch adapts it
            R = max(ranks)
            zA = torch.zeros(R, d_in, device=self.device, dtype=self.dtype)
            zB = torch.zeros(d_out, R, device=self.device, dtype=self.dtype)
            A = torch.stack(
                [
                    torch.stack([_pad_rows(p[0], R) if p else zA for p in seq] + [zA] * (K - len(seq)))
                    for seq in pairs
                ]
            )  # (b, K, R, d_in)
            B = torch.stack(
                [
                    torch.stack([_pad_cols(p[1], R) if p else zB for p in seq] + [zB] * (K - len(seq)))
                    for seq in pairs
                ]
            )  # (b, K, d_out, R)
            nb = len(routed)
            At = A.reshape(nb, K * R, d_in).transpose(1, 2)  # (b, d_in, K*R)
            Bg = torch.einsum("bkor,bk->bkro", B, g).reshape(nb, K * R, d_out)  # (b, K*R, d_out)
            sites[name] = _Site(rows=rows, At=At, Bg=Bg)
        return PreparedRouting(n_seq, sites)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            state: PreparedRouting | None = getattr(self._local, "state", None)
            if state is None:
                return None
            site = state.sites.get(name)
            if site is None:
                return None
            x = args[0]  # (B, T, d_in)
            if x.shape[0] != state.batch_size:
                raise RuntimeError(
                    f"routing was set for a batch of {state.batch_size}, forward got {x.shape[0]}"
                )
            if site.rows is None:
                h = torch.bmm(x, site.At)  # (B, T, K*R)
                return torch.baddbmm(output, h, site.Bg)  # (B, T, d_out)
            h = torch.bmm(x.index_select(0, site.rows), site.At)  # (b, T, K*R)
            return output.index_add(0, site.rows, torch.bmm(h, site.Bg))  # (B, T, d_out)

        return hook


def _pad_rows(a: torch.Tensor, R: int) -> torch.Tensor:
    """(r, d) -> (R, d) with zero rows."""
    return a if a.shape[0] == R else torch.cat([a, a.new_zeros(R - a.shape[0], a.shape[1])], 0)


def _pad_cols(b: torch.Tensor, R: int) -> torch.Tensor:
    """(o, r) -> (o, R) with zero columns."""
    return b if b.shape[1] == R else torch.cat([b, b.new_zeros(b.shape[0], R - b.shape[1])], 1)


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None)
    if d is None:
        raise TypeError(f"{type(model).__name__}.config has no hidden_size")
    return int(d)
