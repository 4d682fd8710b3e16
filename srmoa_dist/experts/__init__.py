"""LoRA experts: the value object, its byte format, LMDB shards, placement, PEFT import/export.

Pure numpy + LMDB (torch only on demand for conversions and PEFT files); no Ray here.
"""

from srmoa_dist.experts.codec import CorruptExpertError, decode_expert, encode_expert
from srmoa_dist.experts.expert import LoRAExpert, bf16_to_f32, f32_to_bf16
from srmoa_dist.experts.peft_io import load_peft_adapter, save_peft_adapter
from srmoa_dist.experts.placement import jump_hash, shard_of
from srmoa_dist.experts.shard import (
    DiskFullError,
    ExpertShard,
    MissingExpertError,
    NoPreviousVersionError,
    ShardFullError,
)
from srmoa_dist.experts.store import ShardedExpertStore

__all__ = [
    "CorruptExpertError",
    "DiskFullError",
    "ExpertShard",
    "LoRAExpert",
    "MissingExpertError",
    "NoPreviousVersionError",
    "ShardFullError",
    "ShardedExpertStore",
    "bf16_to_f32",
    "decode_expert",
    "encode_expert",
    "f32_to_bf16",
    "jump_hash",
    "load_peft_adapter",
    "save_peft_adapter",
    "shard_of",
]
