"""The LoRA expert value object.

One expert is a set of low-rank adapters, one per *target* (a named place in the base model):

    target name -> (A (r, d_in), B (d_out, r))       delta(x) = scaling * B @ (A @ x),  scaling = alpha / r

Target names: ``"layers.{i}.mlp"`` for parallel MLP adapters (d_in = d_out = hidden size) and
``"layers.{i}.self_attn.q_proj"`` (etc.) for LoRA on named linears. All targets of one expert share
one rank, one alpha and one storage dtype.

Storage dtypes are ``float16`` (default), ``bfloat16`` and ``float32``. numpy has no bfloat16, so a
bfloat16 expert holds its arrays as ``uint16`` raw bits (the upper half of the float32 bit pattern,
rounded to nearest even); :func:`bf16_to_f32`, :meth:`LoRAExpert.float32` and
:meth:`LoRAExpert.to_torch` convert on demand (``to_torch`` gives real ``torch.bfloat16`` tensors).

Arrays decoded from the store are read-only views over the record bytes (no copy); construct a new
expert (e.g. with :meth:`LoRAExpert.from_float`) to change weights. ``scaling`` is *not* applied to the
stored B: it is folded once, at fusion time, with :meth:`LoRAExpert.folded`.

An expert made by an edit about a named subject may carry an :class:`ExpertRelation`: the subject and
one relation key a fact it holds (the subject-masked question's state, `routing.relation_gate`), so that
serving can tell which of several experts about one subject a question asks for. It travels in the
record header and is not part of the weights (``same_weights`` ignores it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DTYPES = ("float16", "bfloat16", "float32")

# Storage numpy dtype of each expert dtype (little-endian; bfloat16 = raw uint16 bits).
STORAGE_DTYPE: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
_DTYPE_OF_STORAGE = {v: k for k, v in STORAGE_DTYPE.items()}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 raw bits (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 raw bits (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        rounded = np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)
    return rounded


def to_storage(x: Any, dtype: str) -> np.ndarray:
    """Any float array (numpy or torch, any float dtype) -> the storage array of `dtype`."""
    if dtype not in STORAGE_DTYPE:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if hasattr(x, "detach"):  # a torch tensor: no torch import needed
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x)
    if arr.dtype == STORAGE_DTYPE[dtype] and dtype != "bfloat16":
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a floating-point array, got dtype {arr.dtype}")
    if dtype == "bfloat16":
        return f32_to_bf16(arr)
    return np.ascontiguousarray(arr, dtype=STORAGE_DTYPE[dtype])


def _as_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_to_f32(arr)
    return arr.astype(np.float32)


@dataclass(frozen=True, eq=False)
class ExpertRelation:
    """The subject an edit's expert is about and its facts' relation keys (m, D), unit rows, float16."""

    subject: str
    keys: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise ValueError(f"relation subject must be a non-empty string, got {self.subject!r}")
        keys = np.asarray(self.keys)
        if keys.ndim != 2 or 0 in keys.shape or not np.issubdtype(keys.dtype, np.floating):
            raise ValueError(f"relation keys must be a non-empty 2-D float array (m, D), got {keys.shape}")
        if not np.isfinite(keys).all():
            raise ValueError("relation keys must be finite")
        object.__setattr__(self, "keys", np.ascontiguousarray(keys, dtype=np.float16))

    def plus(self, keys: np.ndarray) -> ExpertRelation:
        """The same subject with more relation keys (a refined expert holds one more fact)."""
        return ExpertRelation(self.subject, np.concatenate([self.keys, np.asarray(keys, np.float16)]))


@dataclass(frozen=True, eq=False)
class LoRAExpert:
    """A frozen LoRA expert: per target (A (r, d_in), B (d_out, r)), one alpha, one dtype.

    ``version`` is set by the shard (1 on the first put, +1 per edit); a fresh expert has 0.
    Construction validates shapes, rank and dtype and raises ``ValueError`` naming the field.
    """

    targets: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: float
    version: int = 0
    relation: ExpertRelation | None = None

    def __post_init__(self) -> None:
        if self.relation is not None and not isinstance(self.relation, ExpertRelation):
            raise ValueError(f"relation must be an ExpertRelation or None, "
                             f"got {type(self.relation).__name__}")
        if not isinstance(self.targets, Mapping) or not self.targets:
            raise ValueError(f"targets must be a non-empty mapping of name -> (A, B), got {self.targets!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating)):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be positive and finite, got {self.alpha!r}")
        v = self.version
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"version must be a non-negative integer, got {self.version!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "version", int(self.version))
        rank = None
        dtype = None
        targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, pair in self.targets.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"target names must be non-empty strings, got {name!r}")
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"targets[{name!r}] must be a pair (A, B), got {type(pair).__name__}")
            a, b = pair
            for field, arr in (("A", a), ("B", b)):
                if not isinstance(arr, np.ndarray):
                    raise ValueError(
                        f"targets[{name!r}].{field} must be a numpy array, got {type(arr).__name__} "
                        "(use LoRAExpert.from_float to convert tensors or other dtypes)"
                    )
                if arr.ndim != 2:
                    raise ValueError(f"targets[{name!r}].{field} must be 2-D, got shape {arr.shape}")
                if arr.dtype not in _DTYPE_OF_STORAGE:
                    raise ValueError(
                        f"targets[{name!r}].{field} has dtype {arr.dtype}; expected float16, float32 or "
                        "uint16 (bfloat16 bits); use LoRAExpert.from_float to convert"
                    )
                if 0 in arr.shape:
                    raise ValueError(f"targets[{name!r}].{field} must not be empty, got shape {arr.shape}")
            if a.dtype != b.dtype:
                raise ValueError(f"targets[{name!r}]: A has dtype {a.dtype} but B has dtype {b.dtype}")
            if rank is None:
                rank = a.shape[0]
                dtype = a.dtype
            if a.shape[0] != rank:
                raise ValueError(
                    f"targets[{name!r}].A has shape {a.shape}: rank {a.shape[0]} != expert rank {rank}"
                )
            if b.shape[1] != rank:
                raise ValueError(
                    f"targets[{name!r}].B has shape {b.shape}: expected (d_out, {rank}) for rank {rank}"
                )
            if a.dtype != dtype:
                raise ValueError(f"targets[{name!r}] has dtype {a.dtype} but other targets have {dtype}")
            targets[name] = (a, b)
        object.__setattr__(self, "targets", targets)

    @classmethod
    def _unchecked(
        cls, targets: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float, version: int,
        relation: ExpertRelation | None = None,
    ) -> LoRAExpert:
        """Build without validation (the codec has already checked the record against its header)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "targets", targets)
        object.__setattr__(obj, "alpha", alpha)
        object.__setattr__(obj, "version", version)
        object.__setattr__(obj, "relation", relation)
        return obj

    def with_relation(self, relation: ExpertRelation | None) -> LoRAExpert:
        """The same weights and version with `relation` attached (None: without one)."""
        if relation is not None and not isinstance(relation, ExpertRelation):
            raise ValueError(f"relation must be an ExpertRelation or None, got {type(relation).__name__}")
        return LoRAExpert._unchecked(self.targets, self.alpha, self.version, relation)

    # -- properties -------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return next(iter(self.targets.values()))[0].shape[0]

    @property
    def scaling(self) -> float:
        """alpha / rank: the factor on B @ A (folded once at fusion time)."""
        return self.alpha / self.rank

    @property
    def dtype(self) -> str:
        """Storage dtype: "float16", "bfloat16" or "float32"."""
        return _DTYPE_OF_STORAGE[next(iter(self.targets.values()))[0].dtype]

    @property
    def nbytes(self) -> int:
        """Bytes of all A and B arrays (the record payload)."""
        return sum(a.nbytes + b.nbytes for a, b in self.targets.values())

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """name -> (d_in, d_out), the argument of :meth:`random`."""
        return {n: (a.shape[1], b.shape[0]) for n, (a, b) in self.targets.items()}

    # -- conversions ------------------------------------------------------------------------------
    def astype(self, dtype: str) -> LoRAExpert:
        """The same expert stored as `dtype` (float16 / bfloat16 / float32)."""
        if dtype not in STORAGE_DTYPE:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == self.dtype:
            return self
        src = self.dtype
        targets = {
            n: (to_storage(_as_float32(a, src), dtype), to_storage(_as_float32(b, src), dtype))
            for n, (a, b) in self.targets.items()
        }
        return LoRAExpert(targets, self.alpha, self.version, self.relation)

    def float32(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (A, B) as float32 arrays (new arrays; bf16 bits converted)."""
        src = self.dtype
        return {n: (_as_float32(a, src), _as_float32(b, src)) for n, (a, b) in self.targets.items()}

    def folded(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (A, scaling * B) as float32: delta(x) = B' @ (A @ x), scaling applied once."""
        s = np.float32(self.scaling)
        return {n: (a, b * s) for n, (a, b) in self.float32().items()}

    def to_torch(
        self,
        device: Any = "cpu",
        dtype: Any = None,
        *,
        fold: bool = False,
        names: Iterable[str] | None = None,
    ) -> dict[str, tuple[Any, Any]]:
        """name -> (A, B) torch tensors (copies; writable). `dtype` None keeps the storage dtype
        (bfloat16 bits become real torch.bfloat16). `fold=True` multiplies B by `scaling`.
        `names` restricts the conversion to some targets (KeyError for an unknown one)."""
        import torch

        out = {}
        for n in self.targets if names is None else names:
            a, b = self.targets[n]
            pair = []
            for arr in (a, b):
                t = torch.from_numpy(np.array(arr, copy=True))
                if self.dtype == "bfloat16":
                    t = t.view(torch.int16).view(torch.bfloat16)
                pair.append(t)
            ta, tb = pair
            if fold:
                tb = (tb.float() * self.scaling).to(tb.dtype)
            if dtype is not None:
                ta, tb = ta.to(dtype), tb.to(dtype)
            out[n] = (ta.to(device), tb.to(device))
        return out

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_float(
        cls, targets: Mapping[str, tuple[Any, Any]], alpha: float, dtype: str = "float16", version: int = 0
    ) -> LoRAExpert:
        """Build from float arrays of any dtype (numpy or torch tensors), converting to `dtype`."""
        if dtype not in STORAGE_DTYPE:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not isinstance(targets, Mapping):
            raise ValueError(f"targets must be a mapping of name -> (A, B), got {type(targets).__name__}")
        conv = {}
        for n, pair in targets.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"targets[{n!r}] must be a pair (A, B), got {type(pair).__name__}")
            conv[n] = (to_storage(pair[0], dtype), to_storage(pair[1], dtype))
        return cls(conv, alpha, version)

    @staticmethod
    def random(
        shapes: Mapping[str, tuple[int, int]],
        rank: int,
        alpha: float,
        dtype: str = "float16",
        seed: int = 0,
        *,
        b_std: float | None = None,
    ) -> LoRAExpert:
        """A random expert. shapes: name -> (d_in, d_out). A ~ N(0, 1/d_in); B ~ N(0, b_std^2) with
        b_std default 1/sqrt(d_out) (nonzero, for tests and benchmarks); b_std=0 gives the usual
        LoRA init (B = 0)."""
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        rng = np.random.default_rng(seed)
        targets = {}
        for n, shape in shapes.items():
            if len(shape) != 2 or any(int(s) <= 0 for s in shape):
                raise ValueError(f"shapes[{n!r}] must be (d_in, d_out) with positive sizes, got {shape!r}")
            d_in, d_out = int(shape[0]), int(shape[1])
            a = rng.standard_normal((rank, d_in), dtype=np.float32) / np.float32(math.sqrt(d_in))
            std = 1.0 / math.sqrt(d_out) if b_std is None else b_std
            b = rng.standard_normal((d_out, rank), dtype=np.float32) * np.float32(std)
            targets[n] = (a, b)
        return LoRAExpert.from_float(targets, alpha, dtype)

    # -- comparison -------------------------------------------------------------------------------
    def same_weights(self, other: LoRAExpert) -> bool:
        """Bit-exact equality of targets, shapes, dtype and alpha (version ignored)."""
        if not isinstance(other, LoRAExpert) or self.alpha != other.alpha:
            return False
        if list(self.targets) != list(other.targets):
            return False
        for n, (a, b) in self.targets.items():
            oa, ob = other.targets[n]
            if a.dtype != oa.dtype or a.shape != oa.shape or b.shape != ob.shape:
                return False
            if a.tobytes() != oa.tobytes() or b.tobytes() != ob.tobytes():
                return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoRAExpert):
            return NotImplemented
        return self.version == other.version and self.same_weights(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"LoRAExpert(targets={len(self.targets)}, rank={self.rank}, alpha={self.alpha}, "
            f"dtype={self.dtype}, version={self.version}, nbytes={self.nbytes})"
        )
