"""Groups of features that evolve alike, and how the dictionary's directions turn between snapshots.

- `cluster_strength_curves`: k-means on the normalised-strength curves [S] of the live features (k-means++
  initialisation, `restarts` seeded restarts, the lowest within-cluster sum of squares kept), clusters numbered by
  when their mean curve first reaches evolution.PRESENT of its peak, then by where it peaks: cluster 0 is the
  earliest. The same seed gives the same clusters.
- `rotation_matrix`: the S x S matrix of mean cosines between a feature's decoder directions at two snapshots,
  averaged over the features with a non-zero decoder at both (optionally only some features, e.g. one kind).
- `emergence_by_step`: how many features emerge at each snapshot, keyed by the snapshot's training step when the
  names say it (`stepN`, as Pythia's revisions and the offline suite name them).

numpy only, like crossjax.analysis.evolution: these run on exported weights without JAX.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError

_STEP_NAME = re.compile(r"^step(\d+)$")


@dataclasses.dataclass(frozen=True)
class Clusters:
    labels: np.ndarray        # [F] int, the cluster of each feature; -1 for dead features
    mean_curves: np.ndarray   # [k, S] mean normalised strength of each cluster's features
    sizes: np.ndarray         # [k] features per cluster
    inertia: float            # within-cluster sum of squared distances of the kept restart

    def to_json(self) -> dict:
        return {"k": int(len(self.sizes)), "sizes": self.sizes.tolist(),
                "mean_curves": np.round(self.mean_curves, 6).tolist(), "inertia": float(self.inertia)}


def cluster_strength_curves(norms: np.ndarray, k: int, *, seed: int = 0, restarts: int = 10,
                            iterations: int = 100) -> Clusters:
    """[S, F] decoder norms -> k clusters of the live features' normalised-strength curves (module docstring).

    k larger than the number of live features is lowered to it; no live feature gives zero clusters.
    """
    norms = np.asarray(norms, np.float64)
    if norms.ndim != 2:
        raise CrossjaxError(f"expected decoder norms [S, F], got shape {norms.shape}; pass evolution.decoder_norms")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise CrossjaxError(f"the number of clusters must be a positive integer, got {k!r}")
    curves = evolution.normalised_strength(norms).T.astype(np.float64)     # [F, S]
    live = norms.max(axis=0) > 0
    labels = np.full(norms.shape[1], -1, np.int64)
    points = curves[live]
    k = min(int(k), len(points))
    if k == 0:
        return Clusters(labels, np.zeros((0, norms.shape[0])), np.zeros(0, np.int64), 0.0)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(int(restarts)):
        got = _lloyd(points, _kmeans_plus_plus(points, k, rng), iterations)
        if best is None or got[2] < best[2] - 1e-12:
            best = got
    assign, centers, inertia = best
    order = sorted(range(k), key=lambda c: _cluster_key(centers[c]))
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    labels[live] = rank[assign]
    means = np.stack([points[labels[live] == c].mean(axis=0) for c in range(k)])
    return Clusters(labels, means, np.bincount(labels[live], minlength=k), float(inertia))


def _cluster_key(center: np.ndarray) -> tuple:
    present = center >= evolution.PRESENT * center.max()
    return int(np.argmax(present)), int(np.argmax(center)), -float(center[-1])


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = _sq_distances(points, np.asarray(centers)).min(axis=1)
        total = d2.sum()
        pick = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=d2 / total)
        centers.append(points[pick])
    return np.asarray(centers)


def _sq_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """[N, k] squared distances, by ||p||^2 - 2 p.c + ||c||^2 (no [N, k, S] temporary)."""
    d2 = (points ** 2).sum(1)[:, None] - 2 * points @ centers.T + (centers ** 2).sum(1)[None]
    return np.maximum(d2, 0.0)


def _lloyd(points: np.ndarray, centers: np.ndarray, iterations: int):
    k = len(centers)
    for _ in range(int(iterations)):
        assign = np.argmin(_sq_distances(points, centers), axis=1)
        onehot = np.eye(k)[assign]                                   # [N, k]
        counts, sums = onehot.sum(0), onehot.T @ points
        # an empty cluster keeps its centre
        moved = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers)
        if np.allclose(moved, centers, atol=1e-12):
            break
        centers = moved
    d2 = _sq_distances(points, centers)
    assign = np.argmin(d2, axis=1)
    return assign, centers, float(d2[np.arange(len(points)), assign].sum())


def rotation_matrix(w_dec: np.ndarray, features: np.ndarray | None = None, *, chunk: int = 1024) -> np.ndarray:
    """[S, F, D] decoder -> [S, S] mean over features of cos(W_dec[s, f], W_dec[t, f]).

    A feature counts at (s, t) when its decoder is non-zero at both; `features` ([F] bool or indices) restricts
    the mean to some features. NaN where no feature counts. Features are processed `chunk` at a time, so the
    memory beyond W_dec is O(S * chunk * D).
    """
    w_dec = np.asarray(w_dec)
    if w_dec.ndim != 3:
        raise CrossjaxError(f"expected a decoder of shape [S, F, D], got {w_dec.shape}; pass params['W_dec']")
    num_s, num_f, _ = w_dec.shape
    selected = np.arange(num_f) if features is None else np.asarray(features)
    if selected.dtype == bool:
        if selected.shape != (num_f,):
            raise CrossjaxError(f"features mask has shape {selected.shape}; expected [F={num_f}] bool")
        selected = np.flatnonzero(selected)
    dots, counts = np.zeros((num_s, num_s)), np.zeros((num_s, num_s))
    for lo in range(0, len(selected), chunk):
        w = w_dec[:, selected[lo:lo + chunk]].astype(np.float32)      # float64 sums below
        n = np.linalg.norm(w, axis=-1)                                  # [S, f]
        ok = n > 0
        unit = np.divide(w, n[..., None], out=np.zeros_like(w), where=ok[..., None])
        dots += np.einsum("sfd,tfd->st", unit, unit).astype(np.float64)
        counts += ok.astype(np.float64) @ ok.T.astype(np.float64)
    return np.divide(dots, counts, out=np.full_like(dots, np.nan), where=counts > 0)


def rotation_by_kind(w_dec: np.ndarray, kinds: np.ndarray) -> dict[str, np.ndarray]:
    """{kind: [S, S] rotation_matrix over that kind's features} for each kind with features, dead ones left out."""
    kinds = np.asarray(kinds)
    return {kind: rotation_matrix(w_dec, kinds == kind) for kind in evolution.KINDS
            if kind != evolution.KIND_DEAD and np.any(kinds == kind)}


def training_steps(snapshot_names: Sequence[str]) -> list[int] | None:
    """The training step of each snapshot from names `stepN`, or None unless every name has that form."""
    steps = [_STEP_NAME.match(str(n)) for n in snapshot_names]
    return None if not all(steps) else [int(m.group(1)) for m in steps]


def emergence_by_step(emergence: np.ndarray, snapshot_names: Sequence[str]) -> dict[str, int]:
    """[F] emergence snapshot indices (-1: never) -> {step (or snapshot name when names carry no step): count},
    in snapshot order, every snapshot listed."""
    emergence = np.asarray(emergence)
    steps = training_steps(snapshot_names)
    keys = [str(s) for s in steps] if steps is not None else [str(n) for n in snapshot_names]
    return {key: int(np.sum(emergence == s)) for s, key in enumerate(keys)}
