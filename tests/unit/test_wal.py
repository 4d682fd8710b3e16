"""wal.py: record format, batches, torn tails, mid-file corruption, rotation."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from srmoa_dist.routing import wal
from srmoa_dist.routing.wal import HEADER, WalCorruptError, WriteAheadLog, replay, wal_files


def rec(i: int, n: int = 3) -> dict:
    return {"op": "update", "ids": np.arange(i, i + n, dtype=np.int64),
            "keys": np.full((n, 4), i, dtype=np.float32), "step": i}


def all_records(d, after=0):
    return [r for b in replay(d, after) for r in b]


def test_roundtrip_batches_and_sequence(tmp_path):
    w = WriteAheadLog(tmp_path, 1)
    assert w.append_batch([rec(0)]) == 1
    assert w.append_batch([rec(1), rec(2), {"op": "step", "step": 3, "cursor": 9}]) == 4
    assert w.append_batch([]) == 4
    w.close()
    batches = list(replay(tmp_path))
    assert [[r["s"] for r in b] for b in batches] == [[1], [2, 3, 4]]
    r = batches[1][1]
    assert r["op"] == "update" and r["e"] == 4 and r["step"] == 2
    assert r["ids"].dtype == np.int64 and r["ids"].tolist() == [2, 3, 4]
    assert r["keys"].dtype == np.float32 and r["keys"].shape == (3, 4) and (r["keys"] == 2).all()
    assert batches[1][2] == {"s": 4, "e": 4, "op": "step", "step": 3, "cursor": 9}
    assert [r["s"] for r in all_records(tmp_path, after=2)] == [3, 4]     # a batch cut by the snapshot seq


def test_append_continues_newest_file(tmp_path):
    w = WriteAheadLog(tmp_path, 1)
    w.append_batch([rec(0)])
    w.close()
    w = WriteAheadLog(tmp_path, 2)
    w.append_batch([rec(1)])
    w.close()
    assert len(wal_files(tmp_path)) == 1
    assert [r["s"] for r in all_records(tmp_path)] == [1, 2]


def _three_batches(tmp_path):
    w = WriteAheadLog(tmp_path, 1)
    w.append_batch([rec(0)])
    w.append_batch([rec(1)])
    w.append_batch([rec(2), rec(3)])
    w.close()
    return wal_files(tmp_path)[0][1]


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_torn_last_record_dropped_with_warning_and_truncated(tmp_path, caplog, cut):
    path = _three_batches(tmp_path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - cut)
    with caplog.at_level(logging.WARNING, logger="srmoa_dist.routing.wal"):
        seqs = [r["s"] for r in all_records(tmp_path)]
    assert seqs == [1, 2]                                   # the whole torn batch (3, 4) goes
    assert "torn" in caplog.text
    good = path.stat().st_size
    assert good < size - cut
    # the repaired log takes appends again
    w = WriteAheadLog(tmp_path, 3)
    w.append_batch([rec(9)])
    w.close()
    assert [r["s"] for r in all_records(tmp_path)] == [1, 2, 3]


def test_zero_filled_tail_is_a_torn_tail(tmp_path, caplog):
    path = _three_batches(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\0" * 100)
    with caplog.at_level(logging.WARNING):
        assert [r["s"] for r in all_records(tmp_path)] == [1, 2, 3, 4]
    assert "torn" in caplog.text


def test_corrupt_last_record_crc_dropped(tmp_path, caplog):
    path = _three_batches(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert [r["s"] for r in all_records(tmp_path)] == [1, 2]


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = _three_batches(tmp_path)
    data = bytearray(path.read_bytes())
    data[HEADER.size + 30] ^= 0xFF                          # inside the first record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorruptError, match="followed by a valid record"):
        all_records(tmp_path)


def test_corrupt_older_file_is_an_error(tmp_path):
    w = WriteAheadLog(tmp_path, 1)
    w.append_batch([rec(0)])
    w.append_batch([rec(1)])
    w.rotate(prune=False)
    w.append_batch([rec(2)])
    w.close()
    assert [r["s"] for r in all_records(tmp_path)] == [1, 2, 3]
    first = wal_files(tmp_path)[0][1]
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size - 3)
    with pytest.raises(WalCorruptError, match="old file"):
        all_records(tmp_path)


def test_rotate_prunes_and_gap_detected(tmp_path):
    w = WriteAheadLog(tmp_path, 1)
    w.append_batch([rec(0)])
    w.append_batch([rec(1)])
    new = w.rotate()
    assert [p for _, p in wal_files(tmp_path)] == [new] and new.name == "wal-00000000000000000003.log"
    w.append_batch([rec(2)])
    w.close()
    assert [r["s"] for r in all_records(tmp_path, after=2)] == [3]
    with pytest.raises(WalCorruptError, match="missing"):
        all_records(tmp_path, after=0)                      # records 1..2 are gone: need the snapshot


def test_torn_header_of_newest_file_removed(tmp_path, caplog):
    w = WriteAheadLog(tmp_path, 1)
    w.append_batch([rec(0)])
    w.close()
    (tmp_path / "wal-00000000000000000002.log").write_bytes(b"SRMO")
    with caplog.at_level(logging.WARNING):
        assert [r["s"] for r in all_records(tmp_path)] == [1]
    assert len(wal_files(tmp_path)) == 1


def test_one_fsync_per_batch(tmp_path, monkeypatch):
    w = WriteAheadLog(tmp_path, 1)
    calls = []
    real = os.fsync
    monkeypatch.setattr(wal.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    w.append_batch([rec(i) for i in range(10)])
    assert len(calls) == 1
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.append_batch([rec(0)])
