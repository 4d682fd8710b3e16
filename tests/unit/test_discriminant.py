"""fit_discriminant: directions that separate labels, not the wordings within one."""

from __future__ import annotations

import numpy as np
import pytest

from srmoa_dist.routing.discriminant import fit_discriminant, fit_within_whitening


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


def test_within_whitening_gives_unit_within_label_covariance_and_keeps_between():
    rng = np.random.default_rng(3)
    X, y = labelled(rng, 300, 5)
    mu, A = fit_within_whitening(X, y, reg=1e-6)
    np.testing.assert_allclose(A, A.T, atol=1e-8)
    Z = (X - mu) @ A
    means = np.stack([Z[y == c].mean(0) for c in range(300)])
    Zw = Z - means[y]
    np.testing.assert_allclose(Zw.T @ Zw / len(Z), np.eye(X.shape[1]), atol=0.05)
    # rewording now moves a vector less than a change of label does
    within = np.linalg.norm(Zw, axis=1).mean()
    between = np.linalg.norm(means - means.mean(0), axis=1).mean()
    assert between > 2 * within


def test_within_whitening_bad_input():
    rng = np.random.default_rng(4)
    X, y = labelled(rng, 5, 3)
    with pytest.raises(ValueError, match="labels must be"):
        fit_within_whitening(X, y[:-1])
    with pytest.raises(ValueError, match="one vector"):
        fit_within_whitening(X[:5], np.arange(5))
    with pytest.raises(ValueError, match="reg must be positive"):
        fit_within_whitening(X, y, reg=-1.0)
