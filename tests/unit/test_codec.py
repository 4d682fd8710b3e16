import struct

import msgpack
import numpy as np
import pytest

from srmoa_dist.experts import codec
from srmoa_dist.experts.codec import (
    FORMAT_VERSION,
    CorruptExpertError,
    decode_expert,
    encode_expert,
    read_header,
    record_version,
    restamp,
    verify_record,
)
from srmoa_dist.experts.expert import DTYPES, LoRAExpert

SHAPES = {
    "layers.7.mlp": (32, 32),
    "layers.8.self_attn.q_proj": (32, 16),
    "layers.8.self_attn.v_proj": (32, 8),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype(dtype):
    e = LoRAExpert.random(SHAPES, rank=4, alpha=7.5, dtype=dtype, seed=5)
    buf = encode_expert(e, version=9)
    d = decode_expert(buf)
    assert d.same_weights(e)
    assert d.version == 9 and d.alpha == 7.5 and d.dtype == dtype and d.rank == 4
    assert list(d.targets) == list(SHAPES)
    assert len(buf) <= e.nbytes + 256  # one small header, no per-array framing
    hdr, off = read_header(buf)
    assert off % 8 == 0
    assert hdr["fmt"] == FORMAT_VERSION and hdr["dtype"] == dtype and hdr["names"] == list(SHAPES)
    assert hdr["shapes"] == [list(s) for s in SHAPES.values()]


def test_decode_is_zero_copy_and_read_only():
    e = LoRAExpert.random(SHAPES, 4, 8.0, "float32", seed=0)
    buf = encode_expert(e)
    d = decode_expert(buf)
    whole = np.frombuffer(buf, np.uint8)
    for a, b in d.targets.values():
        assert np.shares_memory(a, whole) and np.shares_memory(b, whole)
        assert not a.flags.writeable and not b.flags.writeable
        assert a.flags.aligned and b.flags.aligned
    # A writable source buffer still gives read-only views over it (no copy either).
    ba = bytearray(buf)
    d2 = decode_expert(ba)
    a = d2.targets["layers.7.mlp"][0]
    assert not a.flags.writeable
    assert np.shares_memory(a, np.frombuffer(ba, np.uint8))


def test_version_default_and_restamp():
    e = LoRAExpert.random(SHAPES, 2, 4.0, seed=1)
    buf = encode_expert(LoRAExpert(e.targets, e.alpha, version=3))
    assert record_version(buf) == 3
    buf2 = restamp(buf, 11)
    assert record_version(buf2) == 11
    d = decode_expert(buf2)
    assert d.version == 11 and d.same_weights(e)
    assert restamp(buf2, 11) is buf2


def _flip(buf: bytes, pos: int) -> bytes:
    b = bytearray(buf)
    b[pos] ^= 0x01
    return bytes(b)


def test_payload_crc_mismatch_names_id_and_where():
    buf = encode_expert(LoRAExpert.random(SHAPES, 4, 8.0, seed=2))
    bad = _flip(buf, len(buf) - 3)
    msg = r"expert 42 in shard /x/shard-001: payload crc32 mismatch"
    with pytest.raises(CorruptExpertError, match=msg) as ei:
        decode_expert(bad, expert_id=42, where="shard /x/shard-001")
    assert ei.value.expert_id == 42 and ei.value.where == "shard /x/shard-001"
    with pytest.raises(CorruptExpertError, match="crc32"):
        verify_record(bad, expert_id=42)
    assert isinstance(ei.value, ValueError)


def test_header_corruption_detected():
    buf = encode_expert(LoRAExpert.random(SHAPES, 4, 8.0, seed=2))
    for pos in range(8, 20):  # inside the msgpack header
        with pytest.raises(CorruptExpertError, match="expert 7"):
            decode_expert(_flip(buf, pos), expert_id=7)


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda b: b[:3], "shorter than its prefix"),
        (lambda b: b[:-1], "payload is"),
        (lambda b: b + b"\0", "payload is"),
        (lambda b: struct.pack("<II", 10**6, 0) + b[8:], "runs past the record end"),
    ],
)
def test_truncated_or_garbled_records(mangle, match):
    buf = encode_expert(LoRAExpert.random(SHAPES, 4, 8.0, seed=2))
    with pytest.raises(CorruptExpertError, match=match):
        decode_expert(mangle(buf), expert_id=1, where="here")


def test_format_version_mismatch():
    e = LoRAExpert.random(SHAPES, 4, 8.0, seed=2)
    hdr, off = read_header(encode_expert(e))
    hdr["fmt"] = FORMAT_VERSION + 1
    payload = encode_expert(e)[off:]
    other = codec._frame(hdr, payload)
    with pytest.raises(CorruptExpertError, match=r"expert 3 in s: format version 2 is not 1"):
        decode_expert(other, expert_id=3, where="s")


def test_header_shapes_must_match_payload():
    e = LoRAExpert.random(SHAPES, 4, 8.0, seed=2)
    buf = encode_expert(e)
    hdr, off = read_header(buf)
    hdr["shapes"][0] = [33, 32]
    with pytest.raises(CorruptExpertError, match="shapes need"):
        decode_expert(codec._frame(hdr, buf[off:]), expert_id=1)
    hdr2, _ = read_header(buf)
    hdr2["dtype"] = "int8"
    with pytest.raises(CorruptExpertError, match="unknown dtype"):
        decode_expert(codec._frame(hdr2, buf[off:]))


def test_not_a_record():
    junk = struct.pack("<II", 3, 0) + msgpack.packb([1, 2]) + b"\0" * 5
    with pytest.raises(CorruptExpertError):
        decode_expert(junk)
