"""Synthetic multi-snapshot activations with known ground truth, written into an activation store.

Generative model (S snapshots, F true features, D dims). Every row b draws one sparse latent vector
``a[b, i] = fire[b, i] * magnitude[b, i]`` (Bernoulli(firing_prob) times lognormal(0, magnitude_sigma)),
shared by all snapshots, and

    x[b, s] = sum_i a[b, i] * strengths[s, i] * directions[s, i] + noise[b, s],   noise ~ N(0, noise_std^2 I).

Feature kinds (their strength profiles over snapshots):
- ``persistent``: a constant level from snapshot 0;
- ``emergent``: exactly zero before ``emergence_snapshot``, half its level there, full level after;
- ``init_decay``: full level at snapshot 0, decaying exponentially to below 1% by the last snapshot;
- ``transient``: zero, then its level over a window of snapshots, then zero again (zero at both ends).
Directions drift slowly (a small random walk); a fraction of the persistent features also turns sharply by
``rotation_angle`` degrees at ``rotation_snapshot``.

Randomness is keyed so that any unit can be regenerated alone: the ground truth from ``(seed, 0)``, the
latents of block b from ``(seed, 1, b)``, the noise of (block b, snapshot s) from ``(seed, 2, b, s)``. So a
resumed or multi-process generation writes the same bytes as one uninterrupted run. The sums run over a
row's active features in increasing feature order in float64 (no BLAS), so they do not depend on threading.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zipfile
from collections.abc import Mapping

import ml_collections
import numpy as np

from crossjax import configs
from crossjax import store as store_lib
from crossjax.errors import CrossjaxError

KINDS = ("persistent", "emergent", "init_decay", "transient")
TRUTH_FILE = "ground_truth.npz"
_STRENGTH_RANGE = (0.5, 1.5)  # per-feature strength level, uniform


_KEYS = tuple(configs.planted_config().keys())


@dataclasses.dataclass(frozen=True)
class PlantedTruth:
    """The ground truth of a planted store."""

    directions: np.ndarray  # [S, F, D] float32, unit rows
    strengths: np.ndarray  # [S, F] float32, >= 0
    kind: np.ndarray  # [F] str, one of KINDS
    emergence_snapshot: np.ndarray  # [F] int32, -1 when not emergent
    rotation_snapshot: np.ndarray  # [F] int32, -1 when the feature does not turn sharply

    @property
    def num_features(self) -> int:
        return self.strengths.shape[1]

    def to_npz_bytes(self) -> bytes:
        """An .npz archive with fixed timestamps, so equal truths give equal bytes."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for f in dataclasses.fields(self):
                arr = io.BytesIO()
                np.lib.format.write_array(arr, np.asarray(getattr(self, f.name)), allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f.name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), arr.getvalue())
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> PlantedTruth:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(**{f.name: z[f.name] for f in dataclasses.fields(cls)})


def _settings(cfg: Mapping | ml_collections.ConfigDict) -> dict:
    """The planted settings as a plain validated dict (defaults for missing keys)."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    unknown = sorted(set(d) - set(_KEYS))
    if unknown:
        raise CrossjaxError(f"planted config has unknown keys {unknown}: the known keys are {list(_KEYS)}.")
    s = configs.planted_config().to_dict()
    s.update(d)
    for k in ("num_snapshots", "d_model", "num_features", "num_rows", "block_rows"):
        if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] <= 0:
            raise CrossjaxError(f"planted.{k}={s[k]!r}: it must be a positive integer.")
    if not 0.0 < s["firing_prob"] <= 1.0:
        raise CrossjaxError(f"planted.firing_prob={s['firing_prob']}: give a probability in (0, 1].")
    for k in ("magnitude_sigma", "noise_std", "drift"):
        if not (math.isfinite(s[k]) and s[k] >= 0):
            raise CrossjaxError(f"planted.{k}={s[k]}: it must be finite and >= 0.")
    fracs = [s[f"{k}_fraction"] for k in KINDS]
    if any(not 0.0 <= f <= 1.0 for f in fracs) or abs(sum(fracs) - 1.0) > 1e-6:
        raise CrossjaxError(f"planted kind fractions {dict(zip(KINDS, fracs))} must lie in [0, 1] and sum to 1.")
    if not 0.0 <= s["rotation_fraction"] <= 1.0:
        raise CrossjaxError(f"planted.rotation_fraction={s['rotation_fraction']}: give a fraction in [0, 1].")
    if not 0.0 <= s["rotation_angle"] <= 180.0:
        raise CrossjaxError(f"planted.rotation_angle={s['rotation_angle']}: give degrees in [0, 180].")
    S = s["num_snapshots"]
    needs = {"emergent": 2, "init_decay": 2, "transient": 3}
    for k, n in needs.items():
        if s[f"{k}_fraction"] > 0 and S < n:
            raise CrossjaxError(f"planted.{k}_fraction > 0 needs at least {n} snapshots (num_snapshots={S}): set it to 0 or add snapshots.")
    if s["rotation_fraction"] > 0 and s["persistent_fraction"] > 0 and S < 2:
        raise CrossjaxError("planted.rotation_fraction > 0 needs at least 2 snapshots: set it to 0 or add snapshots.")
    if s["dtype"] not in store_lib.DTYPES:
        raise CrossjaxError(f"planted.dtype={s['dtype']!r}: use one of {sorted(store_lib.DTYPES)}.")
    return s


def _kind_counts(fracs: list[float], n: int) -> list[int]:
    """Largest-remainder rounding of fractions of n."""
    raw = [f * n for f in fracs]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def make_truth(cfg: Mapping | ml_collections.ConfigDict) -> PlantedTruth:
    """The ground truth of ``cfg``, a pure function of its settings."""
    s = _settings(cfg)
    S, F, D = s["num_snapshots"], s["num_features"], s["d_model"]
    rng = np.random.default_rng([s["seed"], 0])

    counts = _kind_counts([s[f"{k}_fraction"] for k in KINDS], F)
    kind = np.repeat(np.array(KINDS), counts)[rng.permutation(F)]
    level = rng.uniform(*_STRENGTH_RANGE, F)
    steps = np.arange(S)
    strengths = np.zeros((S, F))
    emergence = np.full(F, -1, np.int32)
    for i in range(F):
        if kind[i] == "persistent":
            strengths[:, i] = level[i]
        elif kind[i] == "emergent":
            e = int(rng.integers(1, S))
            emergence[i] = e
            # zero before e, half at e, full from e + 1: a quick ramp
            strengths[:, i] = level[i] * np.clip((steps - e + 1) / 2.0, 0.0, 1.0)
        elif kind[i] == "init_decay":
            strengths[:, i] = level[i] * np.exp(-5.0 * steps / (S - 1))
        else:  # transient: on over [a, b] with 1 <= a <= b <= S - 2, zero at the first and last snapshot
            a = int(rng.integers(1, S - 1))
            b = int(rng.integers(a, S - 1))
            strengths[:, i] = level[i] * ((steps >= a) & (steps <= b))

    # Directions: a unit base per feature plus a random walk of about `drift` radians per snapshot.
    base = rng.standard_normal((F, D))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    walk = np.cumsum(rng.standard_normal((S, F, D)) * (s["drift"] / math.sqrt(D)), axis=0)
    walk -= walk[:1]  # snapshot 0 is the base itself
    directions = base[None] + walk
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)

    rotation = np.full(F, -1, np.int32)
    persistent = np.flatnonzero(kind == "persistent")
    n_rot = int(round(s["rotation_fraction"] * len(persistent)))
    if n_rot and S >= 2:
        theta = math.radians(s["rotation_angle"])
        for i in rng.choice(persistent, n_rot, replace=False):
            r = int(rng.integers(1, S))
            rotation[i] = r
            v = rng.standard_normal(D)
            for t in range(r, S):
                d = directions[t, i]
                u = v - (v @ d) * d
                u /= np.linalg.norm(u)
                directions[t, i] = math.cos(theta) * d + math.sin(theta) * u

    return PlantedTruth(
        directions=directions.astype(np.float32),
        strengths=strengths.astype(np.float32),
        kind=kind.astype(str),
        emergence_snapshot=emergence,
        rotation_snapshot=rotation,
    )


def block_latents(cfg: Mapping | ml_collections.ConfigDict, block: int) -> np.ndarray:
    """Latent activations ``a [R_b, F]`` (float64) of one block, shared by every snapshot."""
    s = _settings(cfg)
    start, stop = _block_range(s, block)
    rng = np.random.default_rng([s["seed"], 1, block])
    fire = rng.random((stop - start, s["num_features"])) < s["firing_prob"]
    mags = rng.lognormal(0.0, s["magnitude_sigma"], (stop - start, s["num_features"]))
    return np.where(fire, mags, 0.0)


def block_noise(cfg: Mapping | ml_collections.ConfigDict, block: int, snapshot: int) -> np.ndarray:
    """Noise ``[R_b, D]`` (float32) added to (block, snapshot)."""
    s = _settings(cfg)
    start, stop = _block_range(s, block)
    rng = np.random.default_rng([s["seed"], 2, block, snapshot])
    return rng.standard_normal((stop - start, s["d_model"]), dtype=np.float32) * s["noise_std"]


def _block_range(s: dict, block: int) -> tuple[int, int]:
    num_blocks = math.ceil(s["num_rows"] / s["block_rows"])
    if not 0 <= block < num_blocks:
        raise CrossjaxError(f"planted block {block} is out of range: there are {num_blocks} blocks.")
    return block * s["block_rows"], min((block + 1) * s["block_rows"], s["num_rows"])


def _active_lists(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's active features, ascending, padded: (idx [R_b, K] int, vals [R_b, K]); padding is feature F, value 0."""
    R, F = latents.shape
    rows, feats = np.nonzero(latents)  # row-major: per row, features ascending
    counts = np.bincount(rows, minlength=R)
    K = max(int(counts.max(initial=0)), 1)
    pos = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    idx = np.full((R, K), F)
    vals = np.zeros((R, K))
    idx[rows, pos] = feats
    vals[rows, pos] = latents[rows, feats]
    return idx, vals


def _unit_activations(active: tuple[np.ndarray, np.ndarray], truth: PlantedTruth, noise: np.ndarray,
                      snapshot: int) -> np.ndarray:
    """``[R_b, D]`` float64: each row's active features summed in increasing feature order, plus noise.

    The fixed order (no BLAS) keeps the bytes independent of thread counts; it equals the plain sum over all
    features, since inactive features add exact zeros.
    """
    idx, vals = active
    w = truth.strengths[snapshot].astype(np.float64)[:, None] * truth.directions[snapshot].astype(np.float64)  # [F, D]
    w = np.concatenate([w, np.zeros((1, w.shape[1]))])  # row F: the padding feature
    x = np.zeros(noise.shape)
    for k in range(idx.shape[1]):
        x += vals[:, k : k + 1] * w[idx[:, k]]
    return x + noise


def planted_meta(cfg: Mapping | ml_collections.ConfigDict) -> store_lib.StoreMeta:
    """The StoreMeta of a planted store; the settings go in ``extra`` so another config cannot reuse the store."""
    s = _settings(cfg)
    return store_lib.StoreMeta(
        snapshots=tuple(f"planted_{i}" for i in range(s["num_snapshots"])),
        d_model=s["d_model"], num_rows=s["num_rows"], block_rows=s["block_rows"], dtype=s["dtype"],
        model="planted", hook="planted", extra={"planted": json.loads(json.dumps(s))},
    )


def generate_planted(url: str, cfg: Mapping | ml_collections.ConfigDict, *, process_index: int = 0,
                     process_count: int = 1) -> PlantedTruth:
    """Write this process's blocks (``block % process_count == process_index``) of a planted store at ``url``.

    Finished units are skipped, so a rerun resumes. Process 0 saves ``ground_truth.npz`` beside the store.
    """
    if not (isinstance(process_count, int) and process_count > 0 and 0 <= process_index < process_count):
        raise CrossjaxError(f"process_index={process_index}, process_count={process_count}: need 0 <= index < count.")
    truth = make_truth(cfg)
    st = store_lib.ActivationStore.create(url, planted_meta(cfg))
    if process_index == 0:
        data = truth.to_npz_bytes()
        if st.read_file(TRUTH_FILE) != data:
            st.write_file(TRUTH_FILE, data)
    todo: dict[int, list[int | None]] = {}
    for block, snapshot in st.missing_units():
        if block % process_count == process_index:
            todo.setdefault(block, []).append(snapshot)
    for block, units in todo.items():
        start, stop = st.block_range(block)
        active = _active_lists(block_latents(cfg, block))
        for snapshot in units:
            if snapshot is None:
                rows = np.arange(start, stop)
                st.write_tokens(block, rows, rows, np.zeros_like(rows))  # every row is its own one-token context
            else:
                x = _unit_activations(active, truth, block_noise(cfg, block, snapshot), snapshot)
                st.write_block(block, snapshot, x)
    return truth


def load_truth(url: str) -> PlantedTruth:
    """The ground truth saved beside a planted store."""
    data = store_lib.ActivationStore.open(url).read_file(TRUTH_FILE)
    if data is None:
        raise CrossjaxError(f"{url} has no {TRUTH_FILE}: it is not a planted store, or its generation has not started; run generate_planted.")
    return PlantedTruth.from_npz_bytes(data)


def ensure_planted(cfg: Mapping | ml_collections.ConfigDict, url: str) -> store_lib.ActivationStore:
    """The complete planted store of ``cfg`` at ``url``, writing whatever is missing first."""
    st = store_lib.ActivationStore.create(url, planted_meta(cfg))
    if not st.is_complete() or st.read_file(TRUTH_FILE) is None:
        generate_planted(url, cfg)
    return store_lib.ActivationStore.open(url)
