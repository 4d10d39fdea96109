"""Feature lookup for notebooks: which rows activate a crosscoder feature, how often, and how it evolved.

    index = FeatureIndex.build("runs/tiny", store_url=None)     # a workdir (export/ + summary.json) or an export dir
    index.save("runs/tiny/feature_index"); index = FeatureIndex.load("runs/tiny/feature_index")
    report = index.feature(12)                                   # frequency, norms per snapshot, kind, top examples
    index.top_examples(12, k=5, tokenizer="snapshots/step143000/tokenizer.json")
    index.search(emerged_at="step1000", kind="emergent", min_frequency=1e-4)
    index.features_for_row(4711)

`build` makes one streaming pass over the activation store (``batch_rows`` rows at a time, so memory is bounded by
one batch plus the per-feature statistics), then one pass over the store's token arrays only (12 bytes per row) to
collect the tokens around every top example. Statistics per feature:

- frequency: the fraction of scanned rows on which the feature is active (and per snapshot for JumpReLU, whose gate
  is per snapshot); mean activation when active;
- the ``top_k`` rows with the largest activation, ties broken by the lower row (a streaming top-k merge);
- decoder norms per snapshot and the derived strength, emergence, kind and rotation (crossjax.analysis.evolution).

A feature's activation on a row is its value in crosscoder.forward: relu/topk/batchtopk give one value per row;
for JumpReLU the value f[b,s,i] = h[b,i] 1[h n[s,i] > theta_i] is h in every snapshot whose gate opens, so the
row's activation is h when the gate opens in any snapshot and 0 otherwise. BatchTopK activations depend on the
batch; the index uses consecutive batches of ``batch_rows`` rows. Rows are the store's rows: the activation
generator shuffles them at write time, so ``max_rows`` scans a random sample.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import crosscoder
from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write, atomic_write_text
from crossjax.store import ActivationStore

INDEX_ARRAYS = "feature_index.npz"
INDEX_META = "feature_index.json"
INDEX_FORMAT = "crossjax.feature_index"
INDEX_VERSION = 1
_TOKEN_CHUNK = 1 << 20  # rows of token arrays read at once when collecting context windows
_NO_TOKEN = -1  # window slot whose (context, position) holds no stored row (BOS, padding, special tokens)


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class Example:
    """One activating row and the tokens around it in its context.

    positions/tokens: the window of positions around ``position`` in the same context, in order; a token is -1
    where the store holds no row for that position (BOS, padding and special tokens are not stored).
    text: the window decoded with a tokenizer, the activating token between ``marks`` (None without a tokenizer).
    """

    row: int
    value: float
    token_id: int
    context_id: int
    position: int
    positions: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class FeatureReport:
    """Everything the index knows about one feature. Arrays over snapshots follow ``snapshots``."""

    index: int
    snapshots: tuple[str, ...]
    frequency: float  # fraction of scanned rows where the feature is active
    frequency_per_snapshot: np.ndarray  # [S] (JumpReLU gates per snapshot; other activations repeat frequency)
    mean_activation: float  # mean activation over the rows where it is active (0 if never)
    norms: np.ndarray  # [S] decoder norm per snapshot
    strength: np.ndarray  # [S] norms / their maximum
    emergence: str | None  # first snapshot where strength >= the index's emergence threshold (None if dead)
    kind: str  # one of evolution.KINDS
    consecutive_cosine: np.ndarray  # [S-1] cosine of decoder vectors at snapshots s and s+1
    cosine_to_final: np.ndarray  # [S] cosine of each snapshot's decoder vector with the last one's
    sharpest_rotation: str | None  # snapshot s+1 of the lowest consecutive cosine (None with one snapshot)
    top_examples: tuple[Example, ...]

    def __str__(self) -> str:
        lines = [f"feature {self.index}: {self.kind}, emerges at {self.emergence}, frequency {self.frequency:.3g}, "
                 f"mean activation {self.mean_activation:.3g}"]
        lines.append("  strength: " + " ".join(f"{n}={v:.2f}" for n, v in zip(self.snapshots, self.strength)))
        for ex in self.top_examples:
            lines.append(f"  {ex.value:8.3f}  row {ex.row}: " + (ex.text if ex.text is not None else
                                                                 f"token {ex.token_id} (context {ex.context_id}, position {ex.position})"))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Locating the export and the store


def _resolve_export(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """(export dir, the workdir's summary.json or None) from an export dir or a training workdir."""
    p = Path(path)
    if not p.exists():
        raise CrossjaxError(f"{p} does not exist: pass a training workdir (holding export/) or a crosscoder export "
                            "directory (config.json + model.safetensors).")
    # a workdir also holds a config.json (the training config), so look for export/ first
    if (p / "export").is_dir():
        export, summary_file = p / "export", p / "summary.json"
    elif (p / crosscoder.EXPORT_CONFIG).is_file() and (p / crosscoder.EXPORT_WEIGHTS).is_file():
        export, summary_file = p, p.parent / "summary.json"
    else:
        raise CrossjaxError(f"{p} is neither a crosscoder export ({crosscoder.EXPORT_CONFIG} + "
                            f"{crosscoder.EXPORT_WEIGHTS}) nor a workdir with export/: finish training first "
                            "(python -m crossjax.train) or point at the export directory.")
    summary = None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError as e:
            raise CrossjaxError(f"{summary_file} is not valid JSON ({e}); rerun training to rewrite it.") from e
        # an unrelated summary.json beside an export dir is not this export's
        if summary.get("export") and Path(summary["export"]).resolve() != export.resolve():
            summary = None
    return export, summary


def _file_sha256(path: Path) -> str:
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


def _read_columns(store: ActivationStore, start: int, stop: int, columns: list[int] | None) -> np.ndarray:
    """Rows [start, stop) of the snapshots the crosscoder was trained on: [n, S, D] storage dtype."""
    acts = store.read_rows(start, stop)
    return acts if columns is None else acts[:, columns]


def _load_tokenizer(tokenizer: Any):
    """A tokenizers.Tokenizer (or anything with decode) from an object, a tokenizer.json path or its directory."""
    if tokenizer is None or hasattr(tokenizer, "decode"):
        return tokenizer
    p = Path(tokenizer)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise CrossjaxError(f"tokenizer file {p} not found: pass a tokenizers.Tokenizer, a tokenizer.json path or "
                            "a snapshot directory that holds tokenizer.json.")
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(p))


def _decode(tokenizer, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if i != _NO_TOKEN]
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:  # decoders without the keyword
        return tokenizer.decode(ids)


# ----------------------------------------------------------------------------------------------------------------
# The scan: one jitted step per batch of rows


def _feature_values(params, x, cfg: crosscoder.CrosscoderConfig):
    """x [B,S,D] normalised -> (a [B,F] activation per row, active_per_snapshot [S,F] int32 counts over the batch)."""
    h = crosscoder.encode(params, x)
    acts = crosscoder.activate(params, h, cfg)
    if acts.ndim == 3:  # jumprelu, gated per snapshot: [B,S,F]; open gates carry h > 0
        gate = acts > 0
        a = jnp.where(jnp.any(gate, axis=1), h, 0.0)
        per_snapshot = jnp.sum(gate, axis=0, dtype=jnp.int32)
    else:
        a = acts
        per_snapshot = jnp.broadcast_to(jnp.sum(a > 0, axis=0, dtype=jnp.int32), (cfg.num_snapshots, a.shape[1]))
    return a, per_snapshot


@functools.partial(jax.jit, static_argnames=("cfg", "k"))
def _scan_step(top, params, acts, scales, rows, context_ids, positions, token_ids, *, cfg, k):
    """Folds one batch (acts [B,S,D] storage dtype, token arrays [B]) into the running top-k `top` ({.. [F,k]}).

    Returns (top, count [F], act_sum [F], per_snapshot [S,F]) with the batch's own counts and sums.
    """
    a, per_snapshot = _feature_values(params, crosscoder.normalize(acts, scales), cfg)
    active = a > 0
    cand = jnp.where(active, a, -jnp.inf).T  # [F,B]; inactive rows never enter the top-k
    vals, idx = jax.lax.top_k(cand, min(k, cand.shape[1]))
    batch = {"value": vals, "row": rows[idx], "context": context_ids[idx], "position": positions[idx],
             "token": token_ids[idx]}
    # running entries first: they hold lower rows, and top_k keeps the lower index among equal values
    merged = {n: jnp.concatenate([top[n], batch[n]], axis=1) for n in top}
    _, pick = jax.lax.top_k(merged["value"], k)
    top = {n: jnp.take_along_axis(v, pick, axis=1) for n, v in merged.items()}
    return top, jnp.sum(active, axis=0, dtype=jnp.int32), jnp.sum(a, axis=0), per_snapshot


@functools.partial(jax.jit, static_argnames=("cfg",))
def _row_values(params, acts, scales, *, cfg):
    return _feature_values(params, crosscoder.normalize(acts, scales), cfg)[0]


def _window_keys(context: np.ndarray, position: np.ndarray, window: int) -> np.ndarray:
    """Sorted unique keys (context << 32 | position) of the positions within `window` of each (context, position)."""
    offsets = np.arange(-window, window + 1, dtype=np.int64)
    pos = position.astype(np.int64)[:, None] + offsets[None, :]
    ctx = np.broadcast_to(context.astype(np.int64)[:, None], pos.shape)
    keep = pos >= 0
    return np.unique((ctx[keep] << 32) | pos[keep])


def _collect_tokens(store: ActivationStore, wanted: np.ndarray, *, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys, tokens): the stored token of every wanted key (context << 32 | position) that is a row of the store.

    One pass over the token arrays, ``_TOKEN_CHUNK`` rows at a time; memory is bounded by ``wanted``.
    """
    found_keys, found_tokens = [], []
    n = store.meta.num_rows
    bar = _progress(n, "context windows", progress)
    for a in range(0, n, _TOKEN_CHUNK):
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, dynamic_ncols=True, disable=not enabled)


# ----------------------------------------------------------------------------------------------------------------
# The index


class FeatureIndex:
    """Per-feature statistics of one crosscoder over one activation store. Build with :meth:`build`, or
    :meth:`load` a saved one. Arrays: F features, S snapshots, k = top_k."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict):
        self._a = arrays
        self.info = info
        self.snapshots: tuple[str, ...] = tuple(info["snapshots"])
        self.num_features = int(info["num_features"])
        self.rows_scanned = int(info["rows_scanned"])
        self.top_k = int(info["top_k"])
        self.window = int(info["window"])
        self.emergence_threshold = float(info["emergence_threshold"])
        norms = arrays["norms"]
        self.kinds = evolution.classify_kinds(norms)  # [F] str
        self.emergence = evolution.emergence_snapshot(norms, self.emergence_threshold)  # [F] int, -1 if dead
        # context windows: sorted keys (context << 32 | position) and the token stored at each
        self._wkeys = np.asarray(arrays["window_keys"], np.int64)
        self._wtokens = np.asarray(arrays["window_tokens"], np.int32)
        self._window_of: dict[int, int] = {}  # feature -> window collected beyond the built one
        self._export: tuple | None = None
        self._store: ActivationStore | None = None

    # ---- building ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, export_dir_or_workdir: str | os.PathLike, store_url: str | None = None, *,
              max_rows: int | None = None, top_k: int = 20, batch_rows: int = 2048, window: int = 8,
              emergence_threshold: float = 0.5, progress: bool = True) -> FeatureIndex:
        """Scan the store once with the exported crosscoder and collect per-feature statistics.

        export_dir_or_workdir: a crosscoder export (config.json + model.safetensors) or a training workdir.
        store_url: the activation store; None takes it from the workdir's summary.json.
        max_rows: scan only the first rows (the store's rows are shuffled, so this is a random sample).
        window: positions on each side of a top example whose tokens are kept for :meth:`top_examples`.
        """
        for name, value in (("top_k", top_k), ("batch_rows", batch_rows)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise CrossjaxError(f"FeatureIndex.build: {name}={value!r} must be a positive integer.")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
            raise CrossjaxError(f"FeatureIndex.build: window={window!r} must be an integer >= 0.")
        if max_rows is not None and (not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
            raise CrossjaxError(f"FeatureIndex.build: max_rows={max_rows!r} must be a positive integer or None.")
        export, summary = _resolve_export(export_dir_or_workdir)
        if store_url is None:
            if not summary or not summary.get("store"):
                raise CrossjaxError(f"no store_url given and no summary.json naming the store beside {export}: "
                                    "pass store_url (the activation store the crosscoder was trained on).")
            store_url = summary["store"]
        params_np, scales, cfg = crosscoder.load_exported(str(export))
        store = ActivationStore.open(store_url)
        columns = _trained_columns(cfg, export, store, summary.get("snapshots") if summary else None)

        n = store.meta.num_rows if max_rows is None else min(int(max_rows), store.meta.num_rows)
        f = cfg.num_features
        params = {k: jnp.asarray(v) for k, v in params_np.items()}
        scales_j = jnp.asarray(scales)
        top = {"value": jnp.full((f, top_k), -jnp.inf, jnp.float32)}
        for name in ("row", "context", "position", "token"):
            top[name] = jnp.full((f, top_k), -1, jnp.int32)
        count = np.zeros(f, np.int64)
        act_sum = np.zeros(f, np.float64)
        per_snapshot = np.zeros((cfg.num_snapshots, f), np.int64)
        bar = _progress(n, "feature index", progress)
        for a in range(0, n, batch_rows):
            b = min(a + batch_rows, n)
            acts = _read_columns(store, a, b, columns)
            t = store.read_tokens(a, b)
            rows = np.arange(a, b, dtype=np.int32)
            top, c, s, ps = _scan_step(top, params, acts, scales_j, rows, t["context_ids"], t["positions"],
                                       t["token_ids"], cfg=cfg, k=int(top_k))
            count += np.asarray(c)  # host accumulators: exact counts, float64 sums over many batches
            act_sum += np.asarray(s, np.float64)
            per_snapshot += np.asarray(ps)
            bar.update(b - a)
        bar.close()

        top = {name: np.array(v) for name, v in top.items()}  # writable host copies
        empty = ~np.isfinite(top["value"])
        top["value"][empty] = 0.0
        for name in ("row", "context", "position", "token"):
            top[name][empty] = -1
        filled = ~empty
        wanted = _window_keys(top["context"][filled], top["position"][filled], int(window))
        if len(wanted):
            window_keys, window_tokens = _collect_tokens(store, wanted, progress=progress)
        else:
            window_keys, window_tokens = np.zeros(0, np.int64), np.zeros(0, np.int32)

        w_dec = params_np["W_dec"]
        arrays = {
            "count": count, "act_sum": act_sum, "count_per_snapshot": per_snapshot,
            "top_value": top["value"].astype(np.float32), "top_row": top["row"].astype(np.int64),
            "top_context": top["context"], "top_position": top["position"], "top_token": top["token"],
            "norms": evolution.decoder_norms(w_dec),
            "consecutive_cosine": evolution.consecutive_cosine(w_dec).reshape(max(cfg.num_snapshots - 1, 0), f),
            "cosine_to_final": evolution.cosine_to_snapshot(w_dec, -1),
            "window_keys": window_keys, "window_tokens": window_tokens,
        }
        info = {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "snapshots": [store.meta.snapshots[i] for i in (columns or range(store.meta.num_snapshots))],
            "store_columns": columns,
            "num_features": f, "d_model": cfg.d_model, "activation": cfg.activation, "rows_scanned": int(n),
            "store_rows": int(store.meta.num_rows), "top_k": int(top_k), "batch_rows": int(batch_rows),
            "window": int(window), "emergence_threshold": float(emergence_threshold),
            "context_len": store.meta.context_len, "export_dir": str(export.resolve()),
            "export_sha256": _file_sha256(export / crosscoder.EXPORT_WEIGHTS), "store_url": store.url,
            "store_meta_sha256": hashlib.sha256(store.meta.to_json()).hexdigest(),
        }
        index = cls(arrays, info)
        index._export = (params, scales_j, cfg)
        index._store = store
        return index

    # ---- saving --------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write ``path/feature_index.npz`` (arrays) and ``path/feature_index.json`` (settings); returns path."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise CrossjaxError(f"{p} is a file: FeatureIndex.save writes a directory; choose another path.")
        p.mkdir(parents=True, exist_ok=True)
        arrays = dict(self._a, window_keys=self._wkeys, window_tokens=self._wtokens)  # incl. widened windows
        def write_arrays(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
                np.savez(f, **arrays)
        atomic_write(p / INDEX_ARRAYS, write_arrays)
        atomic_write_text(p / INDEX_META, json.dumps(self.info, indent=1) + "\n")
        return str(p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureIndex:
        """An index written by :meth:`save`. The export and store it was built from are opened only when needed
        (:meth:`features_for_row`, wider windows); :meth:`attach` points it at moved copies."""
        p = Path(path)
        files = [p / INDEX_ARRAYS, p / INDEX_META]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CrossjaxError(f"{missing} not found: {p} is not a saved FeatureIndex (write one with "
                                "FeatureIndex.build(...).save(path)).")
        try:
            info = json.loads(files[1].read_text())
        except json.JSONDecodeError as e:
            raise CrossjaxError(f"{files[1]} is not valid JSON ({e}); rebuild the index.") from e
        if info.get("format") != INDEX_FORMAT or info.get("version") != INDEX_VERSION:
            raise CrossjaxError(f"{files[1]} is not a version-{INDEX_VERSION} {INDEX_FORMAT}; rebuild the index.")
        with np.load(files[0], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(arrays, info)

    def attach(self, export_dir: str | os.PathLike | None = None, store_url: str | None = None) -> None:
        """Use these export and store (e.g. moved copies) for queries that need them; both must be the ones the
        index was built from (same weights, same store metadata)."""
        if export_dir is not None:
            export, _ = _resolve_export(export_dir)
            sha = _file_sha256(export / crosscoder.EXPORT_WEIGHTS)
            if sha != self.info["export_sha256"]:
                raise CrossjaxError(f"the crosscoder weights in {export} differ from the ones this index was built "
                                    f"from ({self.info['export_dir']}): pass that export, or rebuild the index.")
            self.info["export_dir"] = str(export.resolve())
            self._export = None
        if store_url is not None:
            store = ActivationStore.open(store_url)
            if hashlib.sha256(store.meta.to_json()).hexdigest() != self.info["store_meta_sha256"]:
                raise CrossjaxError(f"the store {store.url} is not the one this index was built from "
                                    f"({self.info['store_url']}; its meta.json differs): pass that store.")
            self.info["store_url"] = store.url
            self._store = store

    def _get_store(self) -> ActivationStore:
        if self._store is None:
            self.attach(store_url=self.info["store_url"])
        return self._store

    def _get_export(self):
        if self._export is None:
            export = Path(self.info["export_dir"])
            if not (export / crosscoder.EXPORT_WEIGHTS).is_file():
                raise CrossjaxError(f"the crosscoder export {export} is gone: call index.attach(export_dir=...) with "
                                    "its new location.")
            self.attach(export_dir=export)
            params, scales, cfg = crosscoder.load_exported(str(export))
            self._export = ({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(scales), cfg)
        return self._export

    # ---- per-feature arrays --------------------------------------------------------------------------------

    @property
    def counts(self) -> np.ndarray:
        """[F] number of scanned rows where each feature is active."""
        return self._a["count"].copy()

    @property
    def counts_per_snapshot(self) -> np.ndarray:
        """[S,F] number of scanned rows where each feature's gate is open in each snapshot."""
        return self._a["count_per_snapshot"].copy()

    @property
    def frequency(self) -> np.ndarray:
        """[F] fraction of scanned rows where each feature is active."""
        return self._a["count"] / max(self.rows_scanned, 1)

    @property
    def frequency_per_snapshot(self) -> np.ndarray:
        """[S,F] fraction of scanned rows where each feature's gate is open in each snapshot."""
        return self._a["count_per_snapshot"] / max(self.rows_scanned, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """[F] mean activation over the rows where the feature is active (0 if it never is)."""
        c = self._a["count"]
        return np.divide(self._a["act_sum"], c, out=np.zeros(len(c)), where=c > 0)

    @property
    def norms(self) -> np.ndarray:
        """[S,F] decoder norms."""
        return self._a["norms"]

    def _check_feature(self, i) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.num_features:
            raise CrossjaxError(f"feature {i!r} is out of range: this crosscoder has features 0..{self.num_features - 1}.")
        return int(i)

    def _snapshot_index(self, snapshot) -> int:
        if isinstance(snapshot, str):
            if snapshot not in self.snapshots:
                raise CrossjaxError(f"snapshot {snapshot!r} is not one of {list(self.snapshots)}.")
            return self.snapshots.index(snapshot)
        if isinstance(snapshot, bool) or not isinstance(snapshot, (int, np.integer)) or not 0 <= snapshot < len(self.snapshots):
            raise CrossjaxError(f"snapshot {snapshot!r} is out of range: give a name or an index in [0, {len(self.snapshots)}).")
        return int(snapshot)

    # ---- queries -------------------------------------------------------------------------------------------

    def feature(self, i: int, *, tokenizer: Any = None, k: int | None = None, window: int | None = None) -> FeatureReport:
        """The report of feature ``i`` with its top ``k`` examples (all kept ones by default)."""
        i = self._check_feature(i)
        norms = self._a["norms"][:, i]
        cos = self._a["consecutive_cosine"][:, i]
        em = int(self.emergence[i])
        return FeatureReport(
            index=i, snapshots=self.snapshots, frequency=float(self.frequency[i]),
            frequency_per_snapshot=self.frequency_per_snapshot[:, i].copy(),
            mean_activation=float(self.mean_activation[i]), norms=norms.copy(),
            strength=evolution.normalised_strength(norms[:, None])[:, 0],
            emergence=None if em < 0 else self.snapshots[em], kind=str(self.kinds[i]),
            consecutive_cosine=cos.copy(), cosine_to_final=self._a["cosine_to_final"][:, i].copy(),
            sharpest_rotation=self.snapshots[int(np.argmin(cos)) + 1] if len(cos) else None,
            top_examples=tuple(self.top_examples(i, k, tokenizer=tokenizer, window=window)))

    def top_examples(self, i: int, k: int | None = None, tokenizer: Any = None, window: int | None = None,
                     marks: tuple[str, str] = ("[[", "]]")) -> list[Example]:
        """Feature ``i``'s top ``k`` rows (largest activation first) with the tokens ``window`` positions around
        each in its context, decoded by ``tokenizer`` (tokenizers.Tokenizer, tokenizer.json path or snapshot dir)
        when given, the activating token between ``marks``. A window wider than the index's built one reads the
        store's token arrays once for this feature."""
        i = self._check_feature(i)
        k = self.top_k if k is None else int(k)
        if not 0 < k <= self.top_k:
            raise CrossjaxError(f"k={k}: the index keeps the top {self.top_k} rows per feature; "
                                f"ask for 1..{self.top_k} or rebuild with a larger top_k.")
        window = self.window if window is None else int(window)
        if window < 0:
            raise CrossjaxError(f"window={window} must be >= 0.")
        rows = self._a["top_row"][i, :k]
        n = int(np.sum(rows >= 0))
        ctx, pos = self._a["top_context"][i, :n], self._a["top_position"][i, :n]
        if window > max(self.window, self._window_of.get(i, 0)) and n:
            keys, toks = _collect_tokens(self._get_store(), _window_keys(ctx, pos, window), progress=False)
            self._wkeys, first = np.unique(np.concatenate([self._wkeys, keys]), return_index=True)
            self._wtokens = np.concatenate([self._wtokens, toks])[first]
            self._window_of[i] = window
        tok = _load_tokenizer(tokenizer)
        t_len = self.info.get("context_len")
        out = []
        for j in range(n):
            c, p = int(ctx[j]), int(pos[j])
            lo, hi = max(0, p - window), p + window + 1
            if t_len:
                hi = min(hi, int(t_len))
            positions = tuple(range(lo, hi))
            tokens = tuple(self._lookup_tokens(c, positions).tolist())
            text = None
            if tok is not None:
                at = p - lo
                text = (_decode(tok, tokens[:at]) + marks[0] + _decode(tok, [int(self._a["top_token"][i, j])])
                        + marks[1] + _decode(tok, tokens[at + 1:]))
            out.append(Example(row=int(rows[j]), value=float(self._a["top_value"][i, j]),
                               token_id=int(self._a["top_token"][i, j]), context_id=c, position=p,
                               positions=positions, tokens=tokens, text=text))
        return out

    def _lookup_tokens(self, context: int, positions: Sequence[int]) -> np.ndarray:
        """Tokens [len(positions)] stored at (context, position), -1 where the store has no such row."""
        keys = (np.int64(context) << 32) | np.asarray(positions, np.int64)
        if not len(self._wkeys):
            return np.full(len(keys), _NO_TOKEN, np.int32)
        at = np.minimum(np.searchsorted(self._wkeys, keys), len(self._wkeys) - 1)
        return np.where(self._wkeys[at] == keys, self._wtokens[at], _NO_TOKEN).astype(np.int32)

    def search(self, emerged_at: str | int | None = None, kind: str | None = None, min_frequency: float = 0.0,
               max_frequency: float = 1.0) -> np.ndarray:
        """Feature ids (ascending) matching every filter given: emergence snapshot (name or index), kind (one of
        evolution.KINDS), activation frequency within [min_frequency, max_frequency]."""
        keep = (self.frequency >= min_frequency) & (self.frequency <= max_frequency)
        if emerged_at is not None:
            keep &= self.emergence == self._snapshot_index(emerged_at)
        if kind is not None:
            if kind not in evolution.KINDS:
                raise CrossjaxError(f"kind={kind!r} is not one of {list(evolution.KINDS)}.")
            keep &= self.kinds == kind
        return np.flatnonzero(keep)

    def features_for_row(self, row: int, k: int = 10) -> list[tuple[int, float]]:
        """The (feature, activation) pairs active on store row ``row``, largest first, at most ``k``."""
        store = self._get_store()
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < store.meta.num_rows:
            raise CrossjaxError(f"row {row!r} is out of range: the store has rows 0..{store.meta.num_rows - 1}.")
        params, scales, cfg = self._get_export()
        if cfg.activation == "batchtopk":
            # BatchTopK depends on the batch: evaluate the row inside its batch of the build scan
            b = int(self.info["batch_rows"])
            a0 = row // b * b
            end = self.rows_scanned if row < self.rows_scanned else store.meta.num_rows
            acts = _read_columns(store, a0, min(a0 + b, end), self.info.get("store_columns"))
            a = np.asarray(_row_values(params, acts, scales, cfg=cfg))[row - a0]
        else:
            acts = _read_columns(store, row, row + 1, self.info.get("store_columns"))
            a = np.asarray(_row_values(params, acts, scales, cfg=cfg))[0]
        active = np.flatnonzero(a > 0)
        order = active[np.lexsort((active, -a[active]))][:k]
        return [(int(f), float(a[f])) for f in order]

    def __repr__(self) -> str:
        return (f"FeatureIndex(features={self.num_features}, snapshots={len(self.snapshots)}, "
                f"rows_scanned={self.rows_scanned}, top_k={self.top_k})")
