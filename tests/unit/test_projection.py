"""The key map's projection: PCA to 2-D of a real KeyStore's keys."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.config import KeyStoreConfig
from srmoa_dist.routing.keystore import KeyStore
from srmoa_dist.routing.projection import key_dump, pca_2d


def _planar(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points of a plane (n, 2) and the same points embedded in d dims by an orthonormal map."""
    rng = np.random.default_rng(seed)
    plane = rng.standard_normal((n, 2)) * np.array([3.0, 1.0])
    basis, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    return plane, plane @ basis.T + 0.5


def _dists(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)


def test_a_planar_cloud_is_mapped_without_distortion():
    plane, keys = _planar(40, 16)
    p = pca_2d(keys)
    assert p.xy.shape == (40, 2) and p.xy.dtype == np.float32
    np.testing.assert_allclose(_dists(p.xy), _dists(plane), atol=1e-4)     # an isometry of the plane
    assert p.explained[0] > p.explained[1] > 0 and sum(p.explained) == pytest.approx(1.0, abs=1e-6)
    assert p.xy[:, 0].var() > p.xy[:, 1].var()                              # the wider axis first


def test_the_map_is_deterministic_and_does_not_flip():
    _, keys = _planar(30, 8, seed=1)
    a, b = pca_2d(keys), pca_2d(keys[::-1])
    np.testing.assert_allclose(a.xy, b.xy[::-1], atol=1e-5)                 # same keys, same map


def test_degenerate_inputs():
    assert pca_2d(np.zeros((0, 16))).xy.shape == (0, 2)
    assert pca_2d(np.ones((1, 16))).xy.tolist() == [[0.0, 0.0]]
    line = np.outer(np.arange(5.0), np.ones(4))                             # rank 1: the 2nd axis is 0
    p = pca_2d(line)
    assert np.allclose(p.xy[:, 1], 0, atol=1e-5) and p.explained[1] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        pca_2d(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        pca_2d(np.array([[0.0, np.nan], [1.0, 2.0]]))


def test_key_dump_of_a_real_store(tmp_path):
    ks = KeyStore.open(tmp_path / "ks", KeyStoreConfig(d_key=8))
    assert key_dump(ks)["keys"].shape == (0, 8)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    ids = ks.add(keys, pinned=np.array([True, False, False, True, False]))
    ks.free(ids[1:2])
    d = key_dump(ks)
    assert d["ids"].tolist() == [0, 2, 3, 4] and d["keys"].shape == (4, 8)
    assert d["pinned"] == [True, False, True, False] and d["namespaces"] == ["default"] * 4
    np.testing.assert_allclose(d["keys"], keys[[0, 2, 3, 4]], atol=1e-6)
