"""encoder_cache.calibrated: one fit per (model, settings), reused from disk, refit on a torn file."""

from __future__ import annotations

import dataclasses

import numpy as np

from srmoa_dist.model.loading import from_model
from srmoa_dist.routing.encoder_cache import calibrated, fit_key


def test_second_store_reuses_the_fit(tmp_path, tiny_base):
    a = calibrated(tiny_base, 16, tmp_path)
    [f] = list(tmp_path.glob("encoder-*.npz"))
    stamp = f.stat().st_mtime_ns
    b = calibrated(tiny_base, 16, tmp_path)
    assert f.stat().st_mtime_ns == stamp                     # read, not written again
    for name in ("mu", "W", "P"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert b.calibration_hash == a.calibration_hash


def test_key_follows_settings_and_weights(tiny_base, make_tiny_model):
    k = fit_key(tiny_base, 16)
    assert fit_key(tiny_base, 16) == k and fit_key(tiny_base, 8) != k
    other_seed = dataclasses.replace(tiny_base.config, calibration_seed=3)
    assert fit_key(from_model(tiny_base.model, tiny_base.tokenizer, other_seed), 16) != k
    model, tok = make_tiny_model(seed=1)                     # other weights, same settings
    assert fit_key(from_model(model, tok, tiny_base.config), 16) != k


def test_torn_cache_file_is_refitted(tmp_path, tiny_base):
    good = calibrated(tiny_base, 16, tmp_path)
    [f] = list(tmp_path.glob("encoder-*.npz"))
    f.write_bytes(b"PK\x03\x04 torn")
    again = calibrated(tiny_base, 16, tmp_path)
    np.testing.assert_array_equal(again.P, good.P)
    assert len(f.read_bytes()) > 100                         # rewritten whole
