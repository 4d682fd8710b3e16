"""A linear discriminant of pooled hidden states: directions that tell facts apart, not wordings.

Fitted on labelled vectors X (n, D) where a label is one fact (an entity and a relation) and the rows of
a label are its wordings (`routing.relation_corpus`):

    Z  = (X - mu) V_p^T                (n, p)    V_p: the top-p principal directions (noise cut)
    S_w = within-label scatter of Z    (p, p)    what rewording moves
    S_b = between-label scatter of Z   (p, p)    what changing the fact moves
    S_w' = S_w + reg * tr(S_w)/p * I             shrunk, S_w is rank-deficient with few wordings
    A  = S_w'^(-1/2)                             within-label whitening
    U  = top-d eigenvectors of A S_b A           (p, d)
    L  = U^T A V_p                      (d, D)   the discriminant rows; z = L (x - mu)

so z has unit within-label covariance and its axes are ordered by how much they separate labels.
`fit_within_whitening` keeps every direction and only whitens: z = (x - mu) S_w'^(-1/2) (the relation
gate's keys, `routing.relation_gate`, where the labels are relations, not facts).

Shapes: n labelled vectors, D model dim, p principal directions, d discriminant dims.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def _label_means_and_within_scatter(Z: np.ndarray, inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label means (C, k), within-label scatter (k, k)) of rows Z (n, k) labelled 0..C-1 by `inv`."""
    M = np.zeros((int(inv.max()) + 1, Z.shape[1]))
    np.add.at(M, inv, Z)
    M /= np.bincount(inv)[:, None]
    Zw = Z - M[inv]                                                  # (n, k)
    return M, Zw.T @ Zw / len(Z)


def fit_discriminant(X: np.ndarray, labels: np.ndarray, d: int, *, p: int = 256,
                     reg: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), L (d, D)) float64 from labelled vectors X (n, D) (see the module docstring)."""
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    n, D = X.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {labels.shape}")
    classes, inv = np.unique(labels, return_inverse=True)
    if len(classes) <= d:
        raise ValueError(f"need more than d={d} labels to fit {d} discriminant directions, "
                         f"got {len(classes)}")
    if n - len(classes) < 1:
        raise ValueError("every label has one vector: the within-label scatter is undefined")
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    p = min(p, D, n - 1)
    if d > p:
        raise ValueError(f"d={d} is more than the {p} principal directions available")
    mu = X.mean(0)                                                   # (D,)
    _, _, Vt = np.linalg.svd(X - mu, full_matrices=False)
    Vp = Vt[:p]                                                      # (p, D)
    Z = (X - mu) @ Vp.T                                              # (n, p)
    M, Sw = _label_means_and_within_scatter(Z, inv)                 # (C, p), (p, p)
    Mb = M - M.mean(0)
    Sb = Mb.T @ Mb / len(classes)
    ev, E = np.linalg.eigh(Sw + reg * np.trace(Sw) / p * np.eye(p))
    A = (E * ev**-0.5) @ E.T                                         # S_w'^(-1/2), (p, p)
    eb, Ub = np.linalg.eigh(A @ Sb @ A)
    U = Ub[:, ::-1][:, :d]                                           # (p, d), largest first
    L = U.T @ A @ Vp                                                 # (d, D)
    log.info("discriminant fitted on %d vectors of %d labels: %d of %d directions, top ratio %.2f",
             n, len(classes), d, p, float(eb[-1]))
    return mu, L


def fit_within_whitening(X: np.ndarray, labels: np.ndarray, *,
                         reg: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), A (D, D)) float64: z = (x - mu) A has unit within-label covariance (shrunk by `reg`),

        S_w' = S_w + reg * tr(S_w)/D * I,   A = S_w'^(-1/2)   (symmetric)

    so the directions that only reword one label count for little in a cosine of z, and no direction is
    dropped (unlike `fit_discriminant`, whose d axes are the ones the fitted labels differ on, a poor
    basis for labels it never saw)."""
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    n, D = X.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {labels.shape}")
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    classes, inv = np.unique(labels, return_inverse=True)
    if n - len(classes) < 1:
        raise ValueError("every label has one vector: the within-label scatter is undefined")
    _, Sw = _label_means_and_within_scatter(X, inv)                 # (D, D)
    ev, E = np.linalg.eigh(Sw + reg * np.trace(Sw) / D * np.eye(D))
    A = (E * ev**-0.5) @ E.T                                         # (D, D)
    return X.mean(0), A


__all__ = ["fit_discriminant", "fit_within_whitening"]
