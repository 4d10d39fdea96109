"""Building a FeatureIndex: one streaming pass of an exported crosscoder over an activation store.

`scan` reads the store ``batch_rows`` rows at a time (memory: one batch plus the per-feature statistics, none of
which grows with the store), then the store's token arrays only (12 bytes per row) to collect the tokens around
every top example. Statistics per feature: how often it is active (per snapshot too, for JumpReLU's per-snapshot
gates), its mean activation when active (from an exact sum: crossjax/analysis/exact_sum.py), the ``top_k`` rows
with the largest activation (ties: the lower row, by a streaming top-k merge) with the snapshots whose gate opens
on each, activation histograms per snapshot (crossjax.analysis.activation_histograms), and the decoder-norm
evolution (crossjax.analysis.evolution).

A feature's activation on a row is its value in crosscoder.forward: relu/topk/batchtopk give one value per row;
for JumpReLU the value f[b,s,i] = h[b,i] 1[h n[s,i] > theta_i] is h in every snapshot whose gate opens, so the
row's activation is h when the gate opens in any snapshot and 0 otherwise. BatchTopK activations depend on the
batch; the scan uses consecutive batches of ``batch_rows`` rows.

Top rows per snapshot: the gate at snapshot s opens when h n[s,i] > theta_i, which for rows ordered by h holds for a
leading run of them. So the rows firing at s with the largest h are the feature's top rows whose gate opens at s:
the snapshot's own top-k (fewer where fewer rows fire there). The scan keeps, with each top row, the gate of every
snapshot as the step computed it (``top_gate [F,k,S]``: memory F x k x S bytes, flat in the store's size); shared
activations (relu, topk, batchtopk) fire in every snapshot at once.

Devices and processes: the features are split over each process's local devices (crossjax/analysis/index_pass.py);
under jax.distributed every process streams its own contiguous run of the batches and reads only those rows (and
its run of blocks of the token arrays), and the per-feature statistics are merged exactly
(crossjax/analysis/index_merge.py): every process holds the index one process would have built. Every process of
the job must call `scan` (FeatureIndex.build) with the same arguments; FeatureIndex.save writes on process 0.

The export and the store are found from a training workdir (export/ + summary.json) or an export directory. The
store of a run with data.on_the_fly holds its held-out blocks' activations only: `open_store` reopens it as the
run's LiveStore (from the workdir's config.json), so the training rows are computed by the run's snapshots.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import console, crosscoder, crosscoder_export, paths
from crossjax import workdir as workdir_lib
from crossjax.analysis import activation_histograms, evolution, exact_sum, index_merge, index_pass
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, IncompleteStoreError
from crossjax.summary import SUMMARY_FILE, RunSummary

INDEX_FORMAT = "crossjax.feature_index"
INDEX_VERSION = 1
_TOKEN_CHUNK = 1 << 20  # rows of token arrays read at once when collecting context windows


class Scan(NamedTuple):
    """What one pass yields: the index's arrays and settings, and the export and store it opened."""
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    export: tuple  # (params {name: jax.Array}, scales [S] jax.Array, CrosscoderConfig)
    store: ActivationStore


# What a saved index holds: settings (feature_index.json) and arrays of these shapes (F features, S snapshots,
# k = top_k; the two window arrays share one length).
_INFO_TYPES = {"snapshots": list, "num_features": int, "rows_scanned": int, "top_k": int, "window": int,
               "batch_rows": int, "emergence_threshold": (int, float), "export_dir": str, "export_sha256": str,
               "store_url": str, "store_meta_sha256": str, "histogram_bins": int}
TOP_ARRAYS = ("top_value", "top_row", "top_context", "top_position", "top_token")


def array_shapes(info: dict) -> dict[str, tuple[int, ...]]:
    f, s, k = info["num_features"], len(info["snapshots"]), info["top_k"]
    return {"count": (f,), "act_sum": (f,), "count_per_snapshot": (s, f), **{n: (f, k) for n in TOP_ARRAYS},
            "top_gate": (f, k, s), "histogram_counts": (s, f, info["histogram_bins"]), "histogram_exponent": (f,),
            "norms": (s, f), "consecutive_cosine": (max(s - 1, 0), f), "cosine_to_final": (s, f)}


def check_index(arrays: dict[str, np.ndarray], info, where: str) -> None:
    """A loaded index must be what `scan` writes; CrossjaxError naming `where` and the fix otherwise."""
    fix = "rebuild the index: FeatureIndex.build(...).save(path)"
    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT or info.get("version") != INDEX_VERSION:
        raise CrossjaxError(f"{where}: the settings are not a version-{INDEX_VERSION} {INDEX_FORMAT}; {fix}.")
    bad = [k for k, t in _INFO_TYPES.items() if not isinstance(info.get(k), t) or isinstance(info.get(k), bool)]
    if bad or not all(isinstance(n, str) for n in info["snapshots"]) or info["num_features"] < 1 or info["top_k"] < 1 \
            or info["histogram_bins"] < 1:
        raise CrossjaxError(f"{where}: the settings {bad or ['snapshots', 'num_features', 'top_k', 'histogram_bins']} "
                            f"are missing or malformed; {fix}.")
    columns, context_len = info.get("store_columns"), info.get("context_len")
    if not (columns is None or (isinstance(columns, list) and len(columns) == len(info["snapshots"])
                                and all(isinstance(c, int) and c >= 0 for c in columns))) \
            or not (context_len is None or isinstance(context_len, int)):
        raise CrossjaxError(f"{where}: the settings store_columns={columns!r} or context_len={context_len!r} are "
                            f"malformed; {fix}.")
    want = array_shapes(info)

    def fits(n, shape):
        return n in arrays and tuple(arrays[n].shape) == shape and np.issubdtype(arrays[n].dtype, np.number)

    wrong = {n: (f"{arrays[n].dtype} {tuple(arrays[n].shape)}" if n in arrays else None, shape)
             for n, shape in want.items() if not fits(n, shape)}
    windows = [arrays.get(n) for n in ("window_keys", "window_tokens")]
    if any(w is None or w.ndim != 1 or not np.issubdtype(w.dtype, np.integer) for w in windows) \
            or len(windows[0]) != len(windows[1]):
        wrong["window_keys/window_tokens"] = ("missing or of different lengths", "two arrays [W]")
    if wrong:
        raise CrossjaxError(f"{where}: arrays (found, expected) {wrong} do not match the settings; {fix}.")


# ----------------------------------------------------------------------------------------------------------------
# Locating the export and the store


class TrainedOn(NamedTuple):
    """What the run's summary.json says the crosscoder was trained on."""
    store: str                 # the activation store's URL ("" when the summary names none)
    snapshots: list[str] | None  # the store's snapshots it was trained on, in order (None: not recorded)
    workdir: str = ""          # the run's workdir as it is now (holding summary.json and config.json)


def resolve_export(path: str | os.PathLike) -> tuple[Path, TrainedOn | None]:
    """(export dir, what the workdir's summary.json says it was trained on, or None) from an export dir or a
    training workdir."""
    if not isinstance(path, (str, os.PathLike)):
        raise CrossjaxError(f"the crosscoder to index is given as {type(path).__name__}; pass the path of a training "
                            "workdir or of an export directory.")
    p = Path(path)
    if not p.exists():
        raise CrossjaxError(f"{p} does not exist: pass a training workdir (holding export/) or a crosscoder export "
                            "directory (config.json + model.safetensors).")
    # a workdir also holds a config.json (the training config), so look for export/ first
    if (p / "export").is_dir():
        export, summary_file = p / "export", p / SUMMARY_FILE
    elif (p / crosscoder_export.EXPORT_CONFIG).is_file() and (p / crosscoder_export.EXPORT_WEIGHTS).is_file():
        export, summary_file = p, p.parent / SUMMARY_FILE
    else:
        raise CrossjaxError(f"{p} is neither a crosscoder export ({crosscoder_export.EXPORT_CONFIG} + "
                            f"{crosscoder_export.EXPORT_WEIGHTS}) nor a workdir with export/: finish training first "
                            "(python -m crossjax.train) or point at the export directory.")
    if not summary_file.is_file():
        return export, None
    summary = RunSummary.read(summary_file)
    for name in ("workdir", "store", "export"):
        if not isinstance(getattr(summary, name), str):
            raise CrossjaxError(f"{summary_file}: {name} is {getattr(summary, name)!r}, not a path; rerun the same "
                                "training command to rewrite it")
    snapshots = summary.snapshots
    if not (isinstance(snapshots, list) and all(isinstance(n, str) for n in snapshots)):
        raise CrossjaxError(f"{summary_file}: snapshots is {snapshots!r}, not a list of names; rerun the same "
                            "training command to rewrite it")
    # summary.json records absolute paths of the workdir the run finished in; the workdir may have moved since
    workdir = summary_file.parent
    export_here = _same_place(summary.export, summary.workdir, workdir) or summary.export
    # an unrelated summary.json beside an export dir is not this export's
    if summary.export and Path(export_here).resolve() != export.resolve():
        return export, None
    store = summary.store
    if store and "://" not in store and not os.path.exists(store):  # gone: look inside the workdir as it is now
        store = _same_place(store, summary.workdir, workdir) or store
    return export, TrainedOn(store, list(snapshots), str(workdir.resolve()))


def _same_place(recorded: str, recorded_workdir: str, workdir: Path) -> str | None:
    """The place inside `workdir` that the local path `recorded` had inside the workdir the run finished in;
    None for a URL or a path outside that workdir."""
    if not recorded or not recorded_workdir or "://" in recorded:
        return None
    try:
        return str(workdir / Path(recorded).relative_to(recorded_workdir))
    except ValueError:
        return None


def open_store(url: str, trained_on: TrainedOn | None, *, rows: int | None = None,
               progress: bool = True) -> ActivationStore:
    """The store at `url`, to read its first `rows` rows (None: all). A run with data.on_the_fly wrote only its
    held-out blocks' activations there: when those rows are unfinished and the run's config.json says so, the store
    is reopened as the run's LiveStore (crossjax/live_store.py), whose snapshots compute the rows it trained on."""
    store = ActivationStore.open(url)
    workdir = trained_on.workdir if trained_on else ""
    n = store.meta.num_rows if rows is None else min(int(rows), store.meta.num_rows)
    blocks = range(-(-n // store.meta.block_rows))
    if not workdir or _stored(store, blocks):
        return store
    recorded = workdir_lib.read_recorded(workdir) or {}
    if not (recorded.get("data") or {}).get("on_the_fly"):
        return store      # reading it names the unfinished units and the command that writes them
    from crossjax import live_store
    from crossjax.analysis import new_text
    return live_store.reopen(new_text.run_config(workdir), store.url, progress=progress)


def _stored(store: ActivationStore, blocks: range) -> bool:
    """Whether the activations of `blocks` are all written."""
    try:
        store.require_complete(blocks, tokens=False)
    except IncompleteStoreError:
        return False
    return True


def file_sha256(path: Path | str) -> str:
    """The sha256 of a local file (read in chunks) or of a gs:// object."""
    if paths.is_gcs(path):
        return hashlib.sha256(paths.read_bytes(os.fspath(path))).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _trained_columns(cfg: crosscoder.CrosscoderConfig, export: Path, store: ActivationStore,
                     snapshots: Sequence[str] | None) -> list[int] | None:
    """The store's snapshot indices the crosscoder was trained on (None: all, in store order); raise CrossjaxError
    naming both sides if the export and the store describe different data. `snapshots`: the run's summary names."""
    meta = store.meta
    if snapshots is None and cfg.num_snapshots == meta.num_snapshots:
        snapshots = meta.snapshots
    unknown = [] if snapshots is None else [s for s in snapshots if s not in meta.snapshots]
    if cfg.d_model != meta.d_model or snapshots is None or unknown or len(snapshots) != cfg.num_snapshots:
        trained = f"snapshots {list(snapshots)}" if snapshots is not None else f"{cfg.num_snapshots} snapshots"
        raise CrossjaxError(
            f"the crosscoder in {export} was trained on {trained} of d_model {cfg.d_model}, but the store "
            f"{store.url} holds snapshots {list(meta.snapshots)} of d_model {meta.d_model}: pass the store the "
            "crosscoder was trained on.")
    columns = [meta.snapshots.index(s) for s in snapshots]
    return None if columns == list(range(meta.num_snapshots)) else columns


def read_columns(store: ActivationStore, start: int, stop: int, columns: list[int] | None) -> np.ndarray:
    """Rows [start, stop) of the snapshots the crosscoder was trained on: [n, S, D] storage dtype."""
    acts = store.read_rows(start, stop)
    return acts if columns is None else acts[:, columns]


def integer_arg(where: str, name: str, value, *, low: int, none_ok: bool = False) -> int:
    """`value` as an int >= low; CrossjaxError naming the argument otherwise (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        what = f"an integer >= {low}" + (" or None" if none_ok else "")
        raise CrossjaxError(f"{where}: {name}={value!r} must be {what}.")
    return int(value)


def number_arg(where: str, name: str, value, *, low: float, high: float) -> float:
    """`value` as a finite float in [low, high]; CrossjaxError naming the argument otherwise."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not low <= float(value) <= high):
        raise CrossjaxError(f"{where}: {name}={value!r} must be a number in [{low:g}, {high:g}].")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# The scan: crossjax/analysis/index_pass.py streams the rows; under jax.distributed each process streams its share
# and crossjax/analysis/index_merge.py merges them


def window_keys(context: np.ndarray, position: np.ndarray, window: int) -> np.ndarray:
    """Sorted unique keys (context << 32 | position) of the positions within `window` of each (context, position)."""
    offsets = np.arange(-window, window + 1, dtype=np.int64)
    pos = position.astype(np.int64)[:, None] + offsets[None, :]
    ctx = np.broadcast_to(context.astype(np.int64)[:, None], pos.shape)
    keep = pos >= 0
    return np.unique((ctx[keep] << 32) | pos[keep])


def collect_tokens(store: ActivationStore, wanted: np.ndarray, *, progress: bool,
                   rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, tokens): the stored token of every wanted key (context << 32 | position) that is a row of the store
    (of its rows [start, stop) when `rows` is given).

    One pass over the token arrays, ``_TOKEN_CHUNK`` rows at a time; memory is bounded by ``wanted``.
    """
    found_keys, found_tokens = [], []
    start, n = (0, store.meta.num_rows) if rows is None else rows
    bar = console.progress("index.windows", n - start, unit="row", unit_scale=True, enabled=progress)
    for a in range(start, n, _TOKEN_CHUNK):
        b = min(a + _TOKEN_CHUNK, n)
        t = store.read_tokens(a, b)
        keys = (t["context_ids"].astype(np.int64) << 32) | t["positions"].astype(np.int64)
        at = np.searchsorted(wanted, keys)
        hit = (at < len(wanted)) & (wanted[np.minimum(at, len(wanted) - 1)] == keys)
        found_keys.append(keys[hit])
        found_tokens.append(t["token_ids"][hit])
        bar.update(b - a)
    bar.close()
    keys = np.concatenate(found_keys) if found_keys else np.zeros(0, np.int64)
    tokens = np.concatenate(found_tokens) if found_tokens else np.zeros(0, np.int32)
    keys, first = np.unique(keys, return_index=True)  # a well-formed store has each (context, position) once
    return keys, tokens[first].astype(np.int32)


def scan(export_dir_or_workdir: str | os.PathLike, store_url: str | None, *, max_rows: int | None, top_k: int,
         batch_rows: int, window: int, emergence_threshold: float, histogram_bins: int, progress: bool) -> Scan:
    """The arrays and settings of a FeatureIndex (arguments: FeatureIndex.build)."""
    where = "FeatureIndex.build"
    top_k, batch_rows = (integer_arg(where, n, v, low=1) for n, v in (("top_k", top_k), ("batch_rows", batch_rows)))
    histogram_bins = activation_histograms.check_bins(where, histogram_bins)
    window = integer_arg(where, "window", window, low=0)
    max_rows = None if max_rows is None else integer_arg(where, "max_rows", max_rows, low=1, none_ok=True)
    emergence_threshold = number_arg(where, "emergence_threshold", emergence_threshold, low=0.0, high=1.0)
    if store_url is not None and not isinstance(store_url, (str, os.PathLike)):
        raise CrossjaxError(f"{where}: store_url={store_url!r} must be the store's path or URL (a string), or None "
                            "to take it from the run's summary.json.")
    export, trained_on = resolve_export(export_dir_or_workdir)
    if store_url is None:
        if trained_on is None or not trained_on.store:
            raise CrossjaxError(f"no store_url given and no summary.json naming the store beside {export}: "
                                "pass store_url (the activation store the crosscoder was trained on).")
        store_url = trained_on.store
        if "://" not in store_url and not os.path.exists(store_url):
            raise CrossjaxError(f"the run's summary.json names the store {store_url}, which does not exist (was it "
                                "moved?): pass store_url= its location (the activation store the crosscoder was "
                                "trained on).")
    store_url = os.fspath(store_url)
    params_np, scales, cfg = crosscoder_export.load_exported(str(export))
    store = open_store(store_url, trained_on, rows=max_rows, progress=progress)
    columns = _trained_columns(cfg, export, store, trained_on.snapshots if trained_on else None)

    n = store.meta.num_rows if max_rows is None else min(int(max_rows), store.meta.num_rows)
    f = cfg.num_features
    export_sha256 = file_sha256(export / crosscoder_export.EXPORT_WEIGHTS)
    store_meta_sha256 = hashlib.sha256(store.meta.to_json()).hexdigest()
    several = index_merge.distributed()
    if several:
        index_merge.check_same_settings({
            "export_sha256": export_sha256, "store_meta_sha256": store_meta_sha256, "store_columns": columns,
            "rows": n, "top_k": top_k, "batch_rows": batch_rows, "window": window, "histogram_bins": histogram_bins,
            "emergence_threshold": emergence_threshold})
        console.say("index", f"{n} rows over {jax.process_count()} processes, each reading its own run of batches",
                    enabled=progress)
    start, stop = index_merge.row_share(n, batch_rows) if several else (0, n)
    part = _on_every_process(several, lambda: index_pass.stream(
        lambda a, b: read_columns(store, a, b, columns), store.read_tokens, params_np, scales, cfg, start=start,
        stop=stop, top_k=top_k, batch_rows=batch_rows, histogram_bins=histogram_bins, progress=progress))
    if several:
        part = index_merge.merge_parts(part, histogram_bins)

    top = part.top
    empty = ~np.isfinite(top["value"])
    top["value"][empty] = 0.0
    for name in index_pass.TOP_FIELDS:
        top[name][empty] = -1
    top["gate"][empty] = False
    hist_counts = part.hist_counts
    filled = ~empty
    wanted = window_keys(top["context"][filled], top["position"][filled], int(window))
    if len(wanted):  # the same on every process: the top rows are merged
        rows = index_merge.block_share(store.meta.num_rows, store.meta.block_rows) if several else None
        keys, tokens = _on_every_process(several, lambda: collect_tokens(store, wanted, progress=progress, rows=rows))
        if several:
            keys, tokens = index_merge.merge_found_tokens(keys, tokens)
    else:
        keys, tokens = np.zeros(0, np.int64), np.zeros(0, np.int32)

    w_dec = params_np["W_dec"]
    arrays = {
        "count": part.count, "act_sum": exact_sum.to_float64(part.act_sum), "count_per_snapshot": part.per_snapshot,
        "top_value": top["value"].astype(np.float32), "top_row": top["row"].astype(np.int64),
        "top_context": top["context"], "top_position": top["position"], "top_token": top["token"],
        "top_gate": top["gate"].astype(np.uint8),
        # shared activations: one histogram, the same at every snapshot
        "histogram_counts": np.broadcast_to(hist_counts, (cfg.num_snapshots, *hist_counts.shape[1:])).copy(),
        "histogram_exponent": part.hist_exponent,
        "norms": evolution.decoder_norms(w_dec),
        "consecutive_cosine": evolution.consecutive_cosine(w_dec).reshape(max(cfg.num_snapshots - 1, 0), f),
        "cosine_to_final": evolution.cosine_to_snapshot(w_dec, -1),
        "window_keys": keys, "window_tokens": tokens,
    }
    info = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "snapshots": [store.meta.snapshots[i] for i in (columns or range(store.meta.num_snapshots))],
        "store_columns": columns,
        "num_features": f, "d_model": cfg.d_model, "activation": cfg.activation, "rows_scanned": int(n),
        "store_rows": int(store.meta.num_rows), "top_k": int(top_k), "batch_rows": int(batch_rows),
        "window": int(window), "emergence_threshold": float(emergence_threshold),
        "context_len": store.meta.context_len, "export_dir": str(export.resolve()),
        "export_sha256": export_sha256, "store_url": store.url, "store_meta_sha256": store_meta_sha256,
        "histogram_bins": histogram_bins,
        # what FeatureIndex.run needs to reproduce the stored rows from new text, without the store
        "workdir": trained_on.workdir if trained_on else "", "hook": store.meta.hook, "store_dtype": store.meta.dtype,
        "snapshot_hashes": (None if store.meta.snapshot_hashes is None else
                            [store.meta.snapshot_hashes[i] for i in (columns or range(store.meta.num_snapshots))]),
        "tokenizer_sha256": (store.meta.extra.get("tokenizer") or {}).get("sha256"),
    }
    # later queries run on the default device, as those of a loaded index do (the same numbers to the last bit)
    return Scan(arrays, info, ({k: jnp.asarray(v) for k, v in params_np.items()}, jnp.asarray(scales), cfg), store)


def _on_every_process(several: bool, work):
    """work(); with several processes, an error on any of them is raised on all (index_merge.check_all_succeeded)
    before they go on to the next collective."""
    if not several:
        return work()
    try:
        out = work()
    except Exception as e:  # noqa: BLE001 - re-raised here, and named to the other processes
        index_merge.check_all_succeeded(e)
    index_merge.check_all_succeeded(None)
    return out
