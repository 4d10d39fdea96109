"""The FeatureIndex pass over several processes joined by jax.distributed: which rows each reads, and the exact
merge of their statistics into the index one process would have built.

The store's rows are split, not the features: process p of P streams a contiguous run of the pass's batches
(the same batches of `batch_rows` rows as one process, so BatchTopK sees the same batches), and reads the
store's token arrays for its own run of blocks. Each process thus reads 1/P of the store, the only thing that
grows; the per-feature statistics (F x k top rows with their gates, S x F x B histogram counts) are fixed in size
and cross the network once, in chunks of at most `_GATHER_BUDGET` bytes per process (memory: P chunks, not P
copies of the statistics). Splitting the features instead would make every process read the whole store.

The merge is exact. Top rows: each process's top k are the top k of its rows under the pass's order (larger
value first, then the lower row), so the global top k are the first k of the union under that order. Counts
and activation sums (crossjax/analysis/exact_sum.py) are sums of integers. Histograms: every process's counts
are widened to the largest exponent of the feature (activation_histograms.widen, which gives the counts of
binning at that exponent directly), then added. Window tokens: found in row order, first occurrence kept.

Every process calls these functions in the same order (they are collectives); `check_all_succeeded` turns an
error on one process into an error on every process instead of leaving the others waiting.
"""
from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from crossjax.analysis import activation_histograms, exact_sum
from crossjax.analysis.index_pass import Part
from crossjax.errors import CrossjaxError

_GATHER_BUDGET = 1 << 26  # bytes gathered from all processes at once, on each local device


def distributed() -> bool:
    return jax.process_count() > 1


def share(num_items: int) -> tuple[int, int]:
    """This process's contiguous run [first, stop) of num_items items (batches, blocks): sizes differ by <= 1."""
    p, n = jax.process_index(), jax.process_count()
    return p * num_items // n, (p + 1) * num_items // n


def row_share(num_rows: int, batch_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of this process's run of the pass's batches over rows [0, num_rows)."""
    first, stop = share(-(-num_rows // batch_rows))
    return min(first * batch_rows, num_rows), min(stop * batch_rows, num_rows)


def block_share(num_rows: int, block_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of this process's run of the store's blocks (for reading the token arrays)."""
    first, stop = share(-(-num_rows // block_rows))
    return min(first * block_rows, num_rows), min(stop * block_rows, num_rows)


def _gather(x: np.ndarray) -> np.ndarray:
    """[P, *x.shape]: x from every process, any dtype bit for bit (gathered as bytes: jax would turn int64 and
    float64 into 32 bits), in chunks of the budget."""
    x = np.ascontiguousarray(x)
    flat = x.reshape(-1).view(np.uint8)
    out = np.empty((jax.process_count(), flat.size), np.uint8)
    step = 1 << max(16, (_GATHER_BUDGET // (jax.process_count() * jax.local_device_count())).bit_length() - 1)
    for a in range(0, flat.size, step):
        part = flat[a:a + step]
        # padded to a power of two: a few shapes, so a few compilations of the gather, serve every call
        padded = np.zeros(1 << max(8, (len(part) - 1).bit_length()), np.uint8)
        padded[:len(part)] = part
        out[:, a:a + len(part)] = multihost_utils.process_allgather(padded)[:, :len(part)]
    return out.view(x.dtype).reshape(jax.process_count(), *x.shape)


def _gather_bytes(data: bytes) -> list[bytes]:
    """Each process's byte string (of any length), in process order."""
    lengths = _gather(np.array([len(data)], np.int64))[:, 0]
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = np.frombuffer(data, np.uint8)
    return [row[:n].tobytes() for row, n in zip(_gather(padded), lengths)]


def _feature_chunks(num_features: int, bytes_per_feature: int):
    step = max(1, _GATHER_BUDGET // (jax.process_count() * jax.local_device_count() * max(bytes_per_feature, 1)))
    return [(a, min(a + step, num_features)) for a in range(0, num_features, step)]


def check_same_settings(settings: dict) -> None:
    """CrossjaxError on every process unless all were given the same settings (export, store, rows, top_k, ...):
    the merge needs the same shapes and the same batches everywhere."""
    mine = json.dumps(settings, sort_keys=True, default=str)
    every = [b.decode() for b in _gather_bytes(hashlib.sha256(mine.encode()).hexdigest().encode())]
    if len(set(every)) > 1:
        texts = [b.decode() for b in _gather_bytes(mine.encode())]
        differ = sorted(k for k in settings if len({json.dumps(json.loads(t).get(k), default=str)
                                                     for t in texts}) > 1)
        raise CrossjaxError(f"the {len(every)} processes of this jax.distributed job build the FeatureIndex with "
                            f"different settings ({', '.join(differ)}; process 0: "
                            f"{ {k: json.loads(texts[0]).get(k) for k in differ} }): call FeatureIndex.build "
                            "with the same arguments on every process.")


def check_all_succeeded(error: BaseException | None) -> None:
    """After each process's share: re-raise this process's own error, or raise a CrossjaxError naming the
    process that failed and its message, so that no process waits for one that stopped."""
    if error is None:
        mine = ""
    elif isinstance(error, CrossjaxError):
        mine = str(error) or type(error).__name__
    else:
        mine = f"{type(error).__name__}: {error}"
    failed = [(p, m.decode()) for p, m in enumerate(_gather_bytes(mine.encode())) if m]
    if error is not None:
        raise error
    if failed:
        p, message = failed[0]
        raise CrossjaxError(f"process {p} of {jax.process_count()} stopped building the FeatureIndex: {message}")


def merge_parts(part: Part, histogram_bins: int) -> Part:
    """The statistics of every process's rows (identical on every process)."""
    top = _merge_top(part.top)
    exponents = _gather(part.hist_exponent)  # [P, F]
    exponent = exponents.max(axis=0)
    widened = activation_histograms.widen(part.hist_counts, part.hist_exponent, exponent, histogram_bins)
    return Part(top, _sum(widened), exponent, _sum(part.count),
                exact_sum.normalise(_sum(part.act_sum)), _sum(part.per_snapshot))


def _sum(x: np.ndarray) -> np.ndarray:
    """The elementwise sum over processes of integer arrays (exact), gathered a chunk at a time."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    step = max(1, _GATHER_BUDGET // (jax.process_count() * jax.local_device_count() * flat.itemsize))
    for a in range(0, len(flat), step):
        out[a:a + step] = _gather(flat[a:a + step]).sum(axis=0, dtype=flat.dtype)
    return out.reshape(x.shape)


def _merge_top(top: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The top k of every feature over all processes' candidates: larger value first, then the lower row (empty
    slots, value -inf, last), as one process's streaming merge orders them."""
    f, k = top["value"].shape
    out = {name: np.empty_like(v) for name, v in top.items()}
    per_feature = sum(v[0].nbytes for v in top.values()) if f else 0
    for a, b in _feature_chunks(f, per_feature):
        # [P, n, k, ...] -> [n, P k, ...]: each feature's candidates from every process side by side
        # in sorted order on every process: a process that read no rows holds its dict in insertion order, one
        # that did holds jit's (sorted) order, and the gathers must pair the same arrays
        cand = {name: np.moveaxis(_gather(top[name][a:b]), 0, 1).reshape(b - a, -1, *top[name].shape[2:])
                for name in sorted(top)}
        order = np.lexsort((cand["row"], -cand["value"]), axis=-1)[:, :k]
        for name, v in cand.items():
            out[name][a:b] = np.take_along_axis(v, order if v.ndim == 2 else order[:, :, None], axis=1)
    return out


def merge_found_tokens(keys: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, tokens) found by every process in its rows, in process (= row) order, first occurrence kept."""
    all_keys = np.concatenate([np.frombuffer(b, np.int64) for b in _gather_bytes(keys.astype(np.int64).tobytes())])
    all_tokens = np.concatenate([np.frombuffer(b, np.int32)
                                 for b in _gather_bytes(tokens.astype(np.int32).tobytes())])
    all_keys, first = np.unique(all_keys, return_index=True)
    return all_keys, all_tokens[first]
