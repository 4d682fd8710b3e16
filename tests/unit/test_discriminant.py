"""fit_discriminant: directions that separate labels, not the wordings within one."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.routing.discriminant import fit_discriminant


def labelled(rng: np.random.Generator, n_labels: int, per_label: int, D: int = 32):
    """Label signal in dims 0..7 (std 1), wording noise in dims 8..15 (std 4), the rest small noise."""
    centres = np.zeros((n_labels, D))
    centres[:, :8] = rng.standard_normal((n_labels, 8))
    X, y = [], []
    for c in range(n_labels):
        noise = 0.05 * rng.standard_normal((per_label, D))
        noise[:, 8:16] = 4.0 * rng.standard_normal((per_label, 8))
        X.append(centres[c] + noise)
        y += [c] * per_label
    return np.concatenate(X), np.array(y)


def test_keeps_label_directions_and_drops_wording():
    rng = np.random.default_rng(0)
    X, y = labelled(rng, 200, 4)
    mu, L = fit_discriminant(X, y, d=6, p=24)
    assert mu.shape == (32,) and L.shape == (6, 32)
    weight = np.abs(L).sum(0)                    # how much each input dim counts
    assert weight[:8].sum() > 20 * weight[8:16].sum()


def test_within_label_covariance_is_white():
    rng = np.random.default_rng(1)
    X, y = labelled(rng, 300, 5)
    mu, L = fit_discriminant(X, y, d=4, p=24, reg=1e-6)
    Z = (X - mu) @ L.T
    means = np.stack([Z[y == c].mean(0) for c in range(300)])
    Zw = Z - means[y]
    np.testing.assert_allclose(Zw.T @ Zw / len(Z), np.eye(4), atol=0.05)


def test_bad_input_names_the_problem():
    rng = np.random.default_rng(2)
    X, y = labelled(rng, 5, 3)
    with pytest.raises(ValueError, match="more than d=8 labels"):
        fit_discriminant(X, y, d=8)
    with pytest.raises(ValueError, match="labels must be"):
        fit_discriminant(X, y[:-1], d=2)
    with pytest.raises(ValueError, match="one vector"):
        fit_discriminant(X[:5], np.arange(5), d=2)
    with pytest.raises(ValueError, match="reg must be positive"):
        fit_discriminant(X, y, d=2, reg=0.0)
