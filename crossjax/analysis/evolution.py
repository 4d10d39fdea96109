"""How each crosscoder feature evolves over snapshots: strength, emergence, kind, rotation (clusters of strength
curves and the snapshot-by-snapshot rotation matrix: crossjax/analysis/trajectories.py).

All functions take the decoder `W_dec [S, F, D]` (or its norms `[S, F]`) of one crosscoder and work in numpy, so they
run on exported weights without JAX or a mesh. Snapshot index s refers to the store's snapshot order (increasing
training step).
"""

from __future__ import annotations

import numpy as np

from crossjax.errors import CrossjaxError

# Feature kinds, as in the paper's analysis of Pythia (Wu et al. 2025, section "feature kinds").
KIND_INITIALISATION = "initialisation"  # present at the first snapshot, weaker by the end
KIND_EMERGENT = "emergent"  # absent at the first snapshot, forms later and stays
KIND_TRANSIENT = "transient"  # forms later and fades before the end
KIND_PERSISTENT = "persistent"  # strong from the first snapshot to the last
KIND_DEAD = "dead"  # no decoder norm anywhere
KINDS = (KIND_INITIALISATION, KIND_EMERGENT, KIND_TRANSIENT, KIND_PERSISTENT, KIND_DEAD)

# The one presence rule of every analysis: a feature is present at a snapshot where its decoder norm is at least
# this fraction of its own peak over snapshots; it emerges at the first snapshot where it is present, and its kind
# is read from whether it is present at the first and the last snapshot. config.eval.emergence_threshold (default
# this value) sets it for a run's summary and the planted recovery.
PRESENT = 0.5


def decoder_norms(w_dec: np.ndarray) -> np.ndarray:
    """[S, F, D] decoder -> [S, F] norms n[s, f] = ||W_dec[s, f, :]||."""
    w_dec = np.asarray(w_dec, dtype=np.float32)
    if w_dec.ndim != 3:
        raise CrossjaxError(f"expected a decoder of shape [S, F, D], got {w_dec.shape}; pass params['W_dec']")
    return np.linalg.norm(w_dec, axis=-1)


def normalised_strength(norms: np.ndarray) -> np.ndarray:
    """[S, F] norms -> [S, F] norms divided by each feature's maximum over snapshots (0 where the max is 0)."""
    norms = np.asarray(norms, dtype=np.float32)
    peak = norms.max(axis=0, keepdims=True)
    return np.divide(norms, peak, out=np.zeros_like(norms), where=peak > 0)


def emergence_snapshot(norms: np.ndarray, threshold: float = PRESENT) -> np.ndarray:
    """[S, F] norms -> [F] first snapshot index where the normalised strength reaches `threshold` (-1 if dead).

    A feature present from the first snapshot gets 0.
    """
    strength = normalised_strength(norms)
    reached = strength >= threshold
    first = np.argmax(reached, axis=0)
    return np.where(reached.any(axis=0), first, -1)


def classify_kinds(norms: np.ndarray, *, present: float = PRESENT, absent: float = 0.2) -> np.ndarray:
    """[S, F] norms -> [F] kind names (KINDS) from the normalised strength profile.

    present/absent are fractions of the feature's own peak: at the first snapshot a strength >= present means the
    feature exists at initialisation, <= absent means it does not; at the last snapshot the same bounds tell whether
    it survived. Features between the bounds at the first snapshot count as emergent when they peak later.
    """
    strength = normalised_strength(norms)
    first, last = strength[0], strength[-1]
    peak_at = np.argmax(strength, axis=0)
    alive = np.asarray(norms).max(axis=0) > 0
    kinds = np.empty(strength.shape[1], dtype=object)
    starts_present = first >= present
    ends_present = last >= present
    kinds[:] = KIND_EMERGENT
    kinds[starts_present & ends_present] = KIND_PERSISTENT
    kinds[starts_present & ~ends_present] = KIND_INITIALISATION
    kinds[~starts_present & (last <= absent) & (peak_at > 0)] = KIND_TRANSIENT
    kinds[~alive] = KIND_DEAD
    return kinds.astype(str)


def cosine_to_snapshot(w_dec: np.ndarray, reference: int = -1) -> np.ndarray:
    """[S, F, D] -> [S, F] cosine similarity of each snapshot's decoder vector with snapshot `reference`'s."""
    w_dec = np.asarray(w_dec, dtype=np.float32)
    norms = np.linalg.norm(w_dec, axis=-1)
    ref = w_dec[reference]
    dots = np.einsum("sfd,fd->sf", w_dec, ref)
    denom = norms * norms[reference][None, :]
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def consecutive_cosine(w_dec: np.ndarray) -> np.ndarray:
    """[S, F, D] -> [S-1, F] cosine between snapshot s and s+1 decoder vectors: a dip marks a sharp rotation."""
    w_dec = np.asarray(w_dec, dtype=np.float32)
    a, b = w_dec[:-1], w_dec[1:]
    dots = np.einsum("sfd,sfd->sf", a, b)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def summarise(w_dec: np.ndarray, snapshot_names: list[str] | None = None, threshold: float = PRESENT, *,
              clusters: int = 6, cluster_seed: int = 0) -> dict:
    """JSON-ready: counts of kinds, the emergent features' emergence histogram (by snapshot, and by training step
    when the names carry it), the mean rotation matrix [S, S] over live features and per kind, and `clusters`
    k-means clusters of the strength curves (crossjax/analysis/trajectories.py)."""
    from crossjax.analysis import trajectories
    norms = decoder_norms(w_dec)
    num_snapshots = norms.shape[0]
    names = list(snapshot_names) if snapshot_names is not None else [str(s) for s in range(num_snapshots)]
    if len(names) != num_snapshots:
        raise CrossjaxError(f"{len(names)} snapshot names for a decoder with {num_snapshots} snapshots")
    kinds = classify_kinds(norms, present=threshold)
    emergence = emergence_snapshot(norms, threshold)
    emergent = kinds == KIND_EMERGENT
    histogram = {names[s]: int(np.sum(emergence[emergent] == s)) for s in range(num_snapshots)}
    by_step = trajectories.emergence_by_step(np.where(emergent, emergence, -1), names)
    live = kinds != KIND_DEAD

    def matrix(m):      # NaN where no feature counts (written as null in summary.json)
        return np.round(m, 6).tolist()

    return {
        "kinds": {kind: int(np.sum(kinds == kind)) for kind in KINDS},
        "emergent_features_by_snapshot": histogram,
        "emergent_features_by_step": by_step if trajectories.training_steps(names) is not None else None,
        "emergence_threshold": threshold,
        "rotation": matrix(trajectories.rotation_matrix(w_dec, live)),
        "rotation_by_kind": {k: matrix(m) for k, m in trajectories.rotation_by_kind(w_dec, kinds).items()},
        "clusters": trajectories.cluster_strength_curves(norms, clusters, seed=cluster_seed).to_json(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Raw activation units: the crosscoder sees x * scale[s] (crosscoder.normalize), so its reconstruction in the
# store's units is xhat[s] / scale[s] and a feature's decoder vector there is W_dec[s, i] / scale[s].

def raw_unit_norms(norms: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[S, F] decoder norms in normalised units, [S] per-snapshot scales (export / summary) -> [S, F] norms in raw
    activation units, n[s, f] / scale[s]."""
    norms, scales = np.asarray(norms, np.float32), np.asarray(scales, np.float64).reshape(-1)
    if norms.ndim != 2 or scales.shape[0] != norms.shape[0] or not np.all(np.isfinite(scales) & (scales > 0)):
        raise CrossjaxError(f"raw_unit_norms needs norms [S, F] and S finite positive scales; got {norms.shape} and "
                            f"{scales.tolist()}: pass the scales of the export the decoder came from")
    return (norms / scales[:, None]).astype(np.float32)


def compare_raw_units(w_dec: np.ndarray, scales: np.ndarray, snapshot_names: list[str] | None = None,
                      threshold: float = PRESENT) -> dict:
    """Kinds and emergence on normalised against raw-unit decoder norms (JSON-ready): the kinds and emergent
    features by step in raw units, how many features change kind, the count of each change "a->b", and for the
    features emergent in both units whether their emergence snapshot moves."""
    from crossjax.analysis import trajectories
    norms = decoder_norms(w_dec)
    raw = raw_unit_norms(norms, scales)
    names = list(snapshot_names) if snapshot_names is not None else [str(s) for s in range(norms.shape[0])]
    before, after = classify_kinds(norms, present=threshold), classify_kinds(raw, present=threshold)
    emergence = np.where(after == KIND_EMERGENT, emergence_snapshot(raw, threshold), -1)
    changed = before != after
    pairs, counts = np.unique(np.char.add(np.char.add(before[changed], "->"), after[changed]), return_counts=True)
    both = (before == KIND_EMERGENT) & (after == KIND_EMERGENT)
    shift = emergence[both] - emergence_snapshot(norms, threshold)[both]
    return {
        "kinds_raw": {kind: int(np.sum(after == kind)) for kind in KINDS},
        "emergent_features_by_step": trajectories.emergence_by_step(emergence, names),
        "changed": int(changed.sum()),
        "changes": {str(p): int(c) for p, c in zip(pairs, counts)},
        # features emergent in both units: does undoing the normalisation move their emergence snapshot?
        "emergent_in_both": {"features": int(both.sum()), "same": int(np.sum(shift == 0)),
                             "earlier_raw": int(np.sum(shift < 0)), "later_raw": int(np.sum(shift > 0))},
    }
