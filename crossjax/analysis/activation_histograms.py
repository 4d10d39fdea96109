"""Per-feature activation histograms, built in one streaming pass with bins that widen as larger values arrive.

Feature f has B bins (B a power of two) over [0, 2^e_f): e_f is the smallest exponent with every activation of f
seen so far (over all snapshots, so a feature's snapshots share their edges) below 2^e_f. A value v > 0 falls in
bin floor(v B / 2^e_f), exact in floating point since B / 2^e_f is a power of two. When a larger value raises e_f
by d, old bin i becomes bin i >> d: bins of width w merge into bins of width w 2^d, so the final counts are those
of one histogram with the final edges over every value, without reading any row twice. Memory: S x F x B counts,
whatever the number of rows.

Counts are over the rows where the feature is active at the snapshot (value > 0); the inactive rows are the
index's rows_scanned minus its count per snapshot. On the device counts are int32; `Totals` moves them into int64
host counts before they could overflow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from crossjax.errors import CrossjaxError

EMPTY = -1000  # the exponent of a feature that has had no active value yet
_INT32_ROOM = (1 << 31) - 1
_CHUNK_ROWS = 256  # rows binned at once: bounds the bin indices' [rows, S, F] temporary


def check_bins(where: str, bins) -> int:
    """`bins` as a power of two >= 1; CrossjaxError naming the argument otherwise."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1 or bins & (bins - 1):
        raise CrossjaxError(f"{where}: histogram_bins={bins!r} must be a power of two (1, 2, 4, ..., e.g. 32): "
                            "the bins then split exactly as the range doubles.")
    return int(bins)


def init(num_snapshots: int, num_features: int, bins: int) -> dict:
    """Empty histograms (host arrays, to be placed on the devices): counts [S,F,B] int32, exponent [F] int32."""
    return {"counts": np.zeros((num_snapshots, num_features, bins), np.int32),
            "exponent": np.full((num_features,), EMPTY, np.int32)}


def _merge(counts, shift):
    """counts [S,F,B] with each feature's bins widened by 2^shift[f] (shift [F] in 0..log2 B)."""
    f, b = counts.shape[1:]
    into = jnp.arange(b, dtype=jnp.int32)[None, :] >> shift[:, None]  # [F,B] the wider bin of each old bin
    return jnp.zeros_like(counts).at[:, jnp.arange(f)[:, None], into].add(counts)


def update(hist: dict, values) -> dict:
    """Adds values [n,S,F] (0 where inactive) to hist (traced inside the index's jitted step)."""
    counts, exponent = hist["counts"], hist["exponent"]
    log2_bins = int(counts.shape[2]).bit_length() - 1
    peak = jnp.max(values, axis=(0, 1))  # [F]
    _, peak_exp = jnp.frexp(peak)  # peak < 2^peak_exp
    new_exp = jnp.where(peak > 0, jnp.maximum(exponent, peak_exp.astype(jnp.int32)), exponent)
    shift = jnp.clip(new_exp - exponent, 0, log2_bins)
    counts = jax.lax.cond(jnp.any(shift > 0), _merge, lambda c, _: c, counts, shift)
    # v B / 2^e < B, exactly: a product with a power of two (ldexp per feature, not per value: it is slow)
    scale = jnp.ldexp(jnp.ones((), jnp.float32), log2_bins - jnp.maximum(new_exp, -100))
    n, s, f = values.shape
    offset = (jnp.arange(s, dtype=jnp.int32)[:, None] * f + jnp.arange(f, dtype=jnp.int32)[None, :]) * counts.shape[2]
    chunk = min(n, _CHUNK_ROWS)

    def add_chunk(c, flat_counts):
        # the last chunk ends at row n and overlaps the one before: rows below c * chunk are counted already
        start = jnp.minimum(c * chunk, n - chunk)
        v = jax.lax.dynamic_slice_in_dim(values, start, chunk)
        fresh = (start + jnp.arange(chunk) >= c * chunk)[:, None, None]
        bins = jnp.clip(jnp.floor(v * scale[None, None, :]).astype(jnp.int32), 0, counts.shape[2] - 1)
        # one flat scatter over (snapshot, feature, bin): about twice as fast on CPU as three index arrays
        return flat_counts.at[(offset[None] + bins).reshape(-1)].add(((v > 0) & fresh).astype(jnp.int32).reshape(-1))

    counts = jax.lax.fori_loop(0, -(-n // chunk), add_chunk, counts.reshape(-1)).reshape(counts.shape)
    return {"counts": counts, "exponent": new_exp}


def _merge_host(counts: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """numpy `_merge` for the int64 host counts."""
    f, b = counts.shape[1:]
    into = np.arange(b)[None, :] >> shift[:, None]
    out = np.zeros_like(counts)
    np.add.at(out, (slice(None), np.broadcast_to(np.arange(f)[:, None], (f, b)), into), counts)
    return out


def widen(counts: np.ndarray, exponent: np.ndarray, to_exponent: np.ndarray, bins: int) -> np.ndarray:
    """Host counts [S,F,B] binned at `exponent` [F], rebinned at the larger or equal `to_exponent` [F]: the counts
    binning the same values at `to_exponent` gives (bins of width w merge into bins of width w 2^d)."""
    log2_bins = int(bins).bit_length() - 1
    shift = np.clip(np.asarray(to_exponent, np.int64) - np.asarray(exponent, np.int64), 0, log2_bins)
    return _merge_host(counts, shift) if shift.any() else counts


class Totals:
    """int64 host counts of a device histogram: `add` every batch of `rows` rows; device counts that could reach
    the int32 limit are moved here (and zeroed on the device)."""

    def __init__(self, hist: dict):
        self.counts = np.zeros(hist["counts"].shape, np.int64)
        self.exponent = np.full(hist["exponent"].shape, EMPTY, np.int32)
        self._rows_on_device = 0

    def add(self, hist: dict, rows: int, next_rows: int) -> dict:
        """The device histogram to continue with after a batch of `rows` rows, when the next holds `next_rows`."""
        self._rows_on_device += rows
        if self._rows_on_device + next_rows <= _INT32_ROOM:  # a bin counts at most one value per row
            return hist
        self._absorb(hist)
        self._rows_on_device = 0
        return {"counts": jnp.zeros_like(hist["counts"]), "exponent": hist["exponent"]}

    def _absorb(self, hist: dict) -> None:
        exponent = np.asarray(hist["exponent"])
        self.counts = widen(self.counts, self.exponent, exponent, self.counts.shape[2])
        self.counts += np.asarray(hist["counts"], np.int64)
        self.exponent = exponent.copy()

    def result(self, hist: dict) -> tuple[np.ndarray, np.ndarray]:
        """(counts [S,F,B] int64, exponent [F] int32) over every batch added."""
        self._absorb(hist)
        return self.counts, self.exponent


def edges(exponent: np.ndarray, bins: int) -> np.ndarray:
    """[F, B+1] bin edges 0, 2^e/B, ..., 2^e of each feature (NaN for a feature that was never active)."""
    exponent = np.asarray(exponent)
    top = np.where(exponent == EMPTY, np.nan, np.ldexp(1.0, np.maximum(exponent, -1000).astype(np.int64)))
    return top[:, None] * (np.arange(bins + 1) / bins)[None, :]
