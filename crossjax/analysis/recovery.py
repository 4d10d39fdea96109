"""How well a crosscoder trained on planted data recovers the planted truth (crossjax/planted.py).

numpy only: it works on exported decoder weights and the saved ground truth.
"""
from __future__ import annotations

import numpy as np

from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError


def planted_recovery(W_dec: np.ndarray, truth, *, snapshots=None, threshold: float = 0.9,
                     emergence_threshold: float = evolution.PRESENT, presence: float = 0.1) -> dict:
    """How well learned decoder directions W_dec [S,F,D] recover the planted truth.

    snapshots: the store indices of W_dec's S snapshots when the run trained on a subset (data.snapshots); the
    truth of those snapshots is used, presence is still judged against each feature's peak over all snapshots,
    and emergence (a property of the whole snapshot sequence) is not measured.

    A true feature counts as present at a snapshot where its strength is at least `presence` times its peak
    strength over snapshots (a feature decayed to a few percent of its peak is buried in the noise there).
    - mean_max_cos: for each snapshot, the mean over true features present there of the best cosine
      similarity to any learned decoder row of that snapshot; then averaged over snapshots.
    - frac_above: fraction of present (snapshot, true feature) pairs whose best cosine exceeds `threshold`.
    - emergence: each emergent true feature is matched to the learned feature with the highest mean cosine over
      the snapshots where it is present; its predicted emergence snapshot is the analyses' own rule
      (evolution.emergence_snapshot: the first snapshot where the learned decoder norm reaches
      `emergence_threshold` of its peak). Reported: exact and within-one accuracy against the planted emergence
      snapshot.
    - kinds: the kind the analyses give each true feature's match (evolution.classify_kinds) against the planted
      kind (init_decay is the analyses' initialisation kind): kind_agreement overall and per planted kind.
    - rotation: for each planted rotation snapshot r, over the matches of the true features that turn sharply at r,
      the cosine between consecutive snapshots' decoder directions (trajectories.rotation_matrix) and
      sharpest_turn_at, the snapshot after the lowest one; `found` is the fraction of r where that is r (the
      persistent features that do not turn give the baseline curve).
    """
    W = np.asarray(W_dec, np.float64)
    true_dirs = np.asarray(truth.directions, np.float64)         # [S, T, D]
    strengths = np.asarray(truth.strengths, np.float64)          # [S, T]
    present = (strengths > 0) & (strengths >= presence * strengths.max(0, keepdims=True))
    if snapshots is not None:
        sel = np.asarray(list(snapshots), np.int64)
        true_dirs, strengths, present = true_dirs[sel], strengths[sel], present[sel]
    if W.shape[:1] != true_dirs.shape[:1] or W.shape[-1] != true_dirs.shape[-1]:
        raise CrossjaxError(f"W_dec {W.shape} and the planted truth {true_dirs.shape} (snapshots={snapshots}) "
                            "differ in snapshots or d_model; pass the store indices of W_dec's snapshots")
    cos = direction_cosines(true_dirs, W)                        # [S, T, F]
    best = cos.max(-1)                                           # [S, T]
    per_snapshot = [float(best[s][present[s]].mean()) if present[s].any() else float("nan")
                    for s in range(best.shape[0])]
    out = dict(mean_max_cos=float(np.nanmean(per_snapshot)), mean_max_cos_per_snapshot=per_snapshot,
               frac_above=float((best[present] > threshold).mean()), threshold=threshold, presence=presence)

    if snapshots is not None:
        out["snapshots"] = [int(i) for i in snapshots]
        out["note"] = "trained on a subset of the snapshots: emergence is not measured"
        return out
    match = mean_cosine_where_present(cos, present).argmax(-1)  # [T]: each true feature's learned match
    out.update(_kinds_and_rotation(W, truth, match, emergence_threshold))
    emergent = np.flatnonzero(np.asarray(truth.emergence_snapshot) >= 0)
    if emergent.size:
        # the same rule the analyses use: first snapshot where the normalised decoder norm reaches the threshold
        predicted = evolution.emergence_snapshot(evolution.decoder_norms(W)[:, match[emergent]], emergence_threshold)
        target = np.asarray(truth.emergence_snapshot)[emergent]
        out.update(emergence_accuracy=float(np.mean(predicted == target)),
                   emergence_within_one=float(np.mean(np.abs(predicted - target) <= 1)),
                   emergence_threshold=emergence_threshold, num_emergent=int(emergent.size))
    return out


PLANTED_TO_KIND = {"persistent": evolution.KIND_PERSISTENT, "emergent": evolution.KIND_EMERGENT,
                   "init_decay": evolution.KIND_INITIALISATION, "transient": evolution.KIND_TRANSIENT}



def direction_cosines(true_dirs: np.ndarray, W: np.ndarray) -> np.ndarray:
    """[S, T, D] planted directions, [S, F, D] decoder rows -> [S, T, F] cosines at each snapshot."""
    learned = W / np.maximum(np.linalg.norm(W, axis=-1, keepdims=True), 1e-12)
    true_unit = true_dirs / np.maximum(np.linalg.norm(true_dirs, axis=-1, keepdims=True), 1e-12)
    return np.einsum("std,sfd->stf", true_unit, learned)


def mean_cosine_where_present(cos: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[S, T, F] cosines, [S, T] bool -> [T, F]: each pair's mean cosine over the snapshots where the true feature
    is present (the matching rule of planted recovery and of separability against planted strength)."""
    return (cos * present[:, :, None]).sum(0) / np.maximum(present.sum(0), 1)[:, None]

def _kinds_and_rotation(W: np.ndarray, truth, match: np.ndarray, present: float) -> dict:
    from crossjax.analysis.trajectories import rotation_matrix
    planted_kind = np.asarray(truth.kind)
    found = evolution.classify_kinds(evolution.decoder_norms(W), present=present)[match]
    want = np.array([PLANTED_TO_KIND[str(k)] for k in planted_kind])
    out = {"kind_agreement": float(np.mean(found == want)),
           "kind_agreement_by_kind": {k: float(np.mean(found[planted_kind == k] == want[planted_kind == k]))
                                      for k in PLANTED_TO_KIND if np.any(planted_kind == k)}}
    turn_at = np.asarray(truth.rotation_snapshot)
    if np.any(turn_at >= 0) and W.shape[0] > 1:
        def consecutive(features):
            m = rotation_matrix(W, np.unique(match[features]))
            return [float(m[s, s + 1]) for s in range(W.shape[0] - 1)]
        by_snapshot = {}
        for r in sorted({int(r) for r in turn_at[turn_at >= 0]}):
            curve = consecutive(turn_at == r)
            by_snapshot[str(r)] = {"features": int(np.sum(turn_at == r)), "consecutive_cosine": curve,
                                   "sharpest_turn_at": int(np.argmin(curve)) + 1}
        steady = (planted_kind == "persistent") & (turn_at < 0)
        out["rotation"] = {
            "by_planted_snapshot": by_snapshot,
            "found": float(np.mean([v["sharpest_turn_at"] == int(r) for r, v in by_snapshot.items()])),
            "steady_consecutive_cosine": consecutive(steady) if steady.any() else None}
    return out
