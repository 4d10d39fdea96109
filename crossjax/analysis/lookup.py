"""Feature lookup for notebooks: which rows activate a crosscoder feature, how often, and how it evolved.

    index = FeatureIndex.build("runs/tiny", store_url=None)     # a workdir (export/ + summary.json) or an export dir
    index.save("runs/tiny/feature_index"); index = FeatureIndex.load("runs/tiny/feature_index")
    report = index.feature(12)                                   # frequency, norms per snapshot, kind, top examples
    index.top_examples(12, k=5, tokenizer="snapshots/step143000/tokenizer.json")
    index.top_examples(12, snapshot="step1000")                  # the rows it fires on most at that snapshot
    index.histogram(12)                                          # its activation histogram at each snapshot
    index.search(emerged_at="step1000", kind="emergent", min_frequency=1e-4)
    index.features_for_row(4711)
    index.table()                                                # pandas: kind, emergence, cluster, frequency, ...
    print(index.run("The cat sat on the mat."))                  # the features of new text, per token and snapshot

`build` makes one streaming pass over the activation store (crossjax/analysis/index_build.py says what it
collects and how a feature's activation on a row is defined). Rows are the store's rows: the activation
generator shuffles them at write time, so ``max_rows`` scans a random sample. This module holds the index and its
queries: per-feature reports, top examples with their context windows (per snapshot too), histograms, search, the
features of one row; the feature table (crossjax/analysis/feature_table.py) and runs on new text
(crossjax/analysis/new_text.py) are built on it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from crossjax import crosscoder_export, paths
from crossjax.analysis import activation_histograms, evolution, index_build, index_files, index_pass
from crossjax.analysis.index_files import INDEX_ARRAYS, INDEX_META, is_url, path_arg
from crossjax.analysis.index_results import Example, FeatureReport, Histogram
from crossjax.errors import CrossjaxError
from crossjax.snapshot_names import index_of
from crossjax.store import ActivationStore
from crossjax.tokens import open_tokenizer

_NO_TOKEN = -1  # window slot whose (context, position) holds no stored row (BOS, padding, special tokens)
__all__ = ["Example", "FeatureIndex", "FeatureReport", "Histogram", "INDEX_ARRAYS", "INDEX_META"]


# ----------------------------------------------------------------------------------------------------------------
# The index


def _export_and_sha256(export_dir) -> tuple[str, str]:
    """(the export directory, resolved, or a gs:// prefix; the hash of its weights) of an export or a workdir."""
    if not is_url(export_dir):
        export, _ = index_build.resolve_export(export_dir)
        return str(export.resolve()), index_build.file_sha256(export / crosscoder_export.EXPORT_WEIGHTS)
    where = paths.absolute(export_dir)
    if paths.isdir(paths.join(where, "export")):   # a workdir, as resolve_export takes it
        where = paths.join(where, "export")
    weights = paths.join(where, crosscoder_export.EXPORT_WEIGHTS)
    if not paths.isfile(weights):
        raise CrossjaxError(f"{where} is neither a crosscoder export ({crosscoder_export.EXPORT_WEIGHTS}) nor a "
                            "workdir with export/: finish training first (python -m crossjax.train) or point at the "
                            "export.")
    return where, index_build.file_sha256(weights)


def _decode(tokenizer, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if i != _NO_TOKEN]
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=False)
    except TypeError:  # decoders without the keyword
        return tokenizer.decode(ids)


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
              emergence_threshold: float = 0.5, histogram_bins: int = 32, progress: bool = True) -> FeatureIndex:
        """Scan the store once with the exported crosscoder and collect per-feature statistics.

        export_dir_or_workdir: a crosscoder export (config.json + model.safetensors) or a training workdir,
            local or on gs://.
        store_url: the activation store; None takes it from the workdir's summary.json.
        max_rows: scan only the first rows (the store's rows are shuffled, so this is a random sample).
        window: positions on each side of a top example whose tokens are kept for :meth:`top_examples`.
        histogram_bins: bins of each feature's activation histograms (a power of two; :meth:`histogram`).
        Under jax.distributed every process calls build with the same arguments: each reads only its share of the
        rows and all get the index one process would build (crossjax/analysis/index_merge.py).
        """
        settings = dict(max_rows=max_rows, top_k=top_k, batch_rows=batch_rows, window=window,
                        emergence_threshold=emergence_threshold, histogram_bins=histogram_bins, progress=progress)
        if is_url(export_dir_or_workdir):    # a run on gs://: its export staged locally for the pass
            from crossjax.analysis import remote_run
            with remote_run.staged(os.fspath(export_dir_or_workdir)) as local:
                scan = index_build.scan(local, store_url, **settings)
                remote_run.restore_places(scan.info, os.fspath(export_dir_or_workdir), local)
        else:
            scan = index_build.scan(export_dir_or_workdir, store_url, **settings)
        index = cls(scan.arrays, scan.info)
        index._export = scan.export
        index._store = scan.store
        return index

    # ---- saving --------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> str:
        """Write ``path/feature_index.npz`` (arrays) and ``path/feature_index.json`` (settings); returns path
        (a directory, or a gs:// prefix). Under jax.distributed only process 0 writes (every process holds the
        same index)."""
        arrays = dict(self._a, window_keys=self._wkeys, window_tokens=self._wtokens)  # incl. widened windows
        return index_files.write_index(arrays, self.info, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureIndex:
        """An index written by :meth:`save` (a directory or a gs:// prefix). The export and store it was built
        from are opened only when needed (:meth:`features_for_row`, wider windows); :meth:`attach` points it at
        moved copies."""
        arrays, info, where = index_files.read_index(path)
        index_build.check_index(arrays, info, where)
        return cls(arrays, info)

    def attach(self, export_dir: str | os.PathLike | None = None, store_url: str | None = None) -> None:
        """Use these export and store (e.g. moved copies) for queries that need them; both must be the ones the
        index was built from (same weights, same store metadata)."""
        if export_dir is not None:
            export, sha = _export_and_sha256(export_dir)
            if sha != self.info["export_sha256"]:
                raise CrossjaxError(f"the crosscoder weights in {export} differ from the ones this index was built "
                                    f"from ({self.info['export_dir']}): pass that export, or rebuild the index.")
            self.info["export_dir"] = export
            self._export = None
        if store_url is not None:
            # an on-the-fly run's store is reopened with its snapshots (index_build.open_store)
            store = index_build.open_store(path_arg("attach", store_url, url=True),
                                           index_build.TrainedOn("", None, self.info.get("workdir") or ""))
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
            export = self.info["export_dir"]
            if not paths.isfile(paths.join(export, crosscoder_export.EXPORT_WEIGHTS)):
                raise CrossjaxError(f"the crosscoder export {export} is gone: call index.attach(export_dir=...) with "
                                    "its new location.")
            self.attach(export_dir=export)
            params, scales, cfg = crosscoder_export.load_exported(export)
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
                     marks: tuple[str, str] = ("[[", "]]"), snapshot: str | int | None = None) -> list[Example]:
        """Feature ``i``'s top ``k`` rows (largest activation first) with the tokens ``window`` positions around
        each in its context, decoded by ``tokenizer`` (tokenizers.Tokenizer, tokenizer.json path or snapshot dir)
        when given, the activating token between ``marks``. With ``snapshot`` (name or index): the top rows on which
        the feature fires at that snapshot, its own top-k (JumpReLU gates per snapshot, so fewer where it is weak;
        other activations fire in every snapshot alike). A window wider than the index's built one reads the
        store's token arrays once for this feature."""
        i = self._check_feature(i)
        k = self.top_k if k is None else index_build.integer_arg("top_examples", "k", k, low=1)
        if k > self.top_k:
            raise CrossjaxError(f"k={k}: the index keeps the top {self.top_k} rows per feature; "
                                f"ask for 1..{self.top_k} or rebuild with a larger top_k.")
        window = self.window if window is None else index_build.integer_arg("top_examples", "window", window, low=0)
        if not (isinstance(marks, (tuple, list)) and len(marks) == 2 and all(isinstance(m, str) for m in marks)):
            raise CrossjaxError(f"top_examples: marks={marks!r} must be two strings (before, after).")
        kept = np.flatnonzero(self._a["top_row"][i] >= 0)
        if snapshot is not None:
            s = index_of(snapshot, self.snapshots, where="this index")
            kept = kept[self._a["top_gate"][i, kept, s] > 0]
        picked = kept[:k]
        if window > max(self.window, self._window_of.get(i, 0)) and len(kept):
            every = self._a["top_row"][i] >= 0  # all of the feature's rows: later calls may ask for other ones
            keys, toks = index_build.collect_tokens(
                self._get_store(), index_build.window_keys(self._a["top_context"][i, every],
                                                           self._a["top_position"][i, every], window), progress=False)
            self._wkeys, first = np.unique(np.concatenate([self._wkeys, keys]), return_index=True)
            self._wtokens = np.concatenate([self._wtokens, toks])[first]
            self._window_of[i] = window
        tok = open_tokenizer(tokenizer)
        if tok is not None and not callable(getattr(tok, "decode", None)):
            raise CrossjaxError(f"tokenizer={tokenizer!r} cannot decode: pass a tokenizers.Tokenizer, a "
                                "tokenizer.json path or a snapshot directory holding one.")
        t_len = self.info.get("context_len")
        out = []
        for j in picked:
            c, p = int(self._a["top_context"][i, j]), int(self._a["top_position"][i, j])
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
            out.append(Example(row=int(self._a["top_row"][i, j]), value=float(self._a["top_value"][i, j]),
                               token_id=int(self._a["top_token"][i, j]), context_id=c, position=p,
                               positions=positions, tokens=tokens, text=text))
        return out

    def histogram(self, i: int) -> Histogram:
        """Feature ``i``'s activation histogram at each snapshot over the scanned rows where it is active
        (crossjax/analysis/activation_histograms.py: ``histogram_bins`` bins from 0 to the power of two just above
        its largest activation, the same edges at every snapshot)."""
        i = self._check_feature(i)
        bins = int(self.info["histogram_bins"])
        edges = activation_histograms.edges(self._a["histogram_exponent"][i:i + 1], bins)[0]
        return Histogram(i, self.snapshots, edges, self._a["histogram_counts"][:, i].astype(np.int64))

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
        min_frequency, max_frequency = (index_build.number_arg("search", n, v, low=0.0, high=1.0) for n, v in
                                        (("min_frequency", min_frequency), ("max_frequency", max_frequency)))
        keep = (self.frequency >= min_frequency) & (self.frequency <= max_frequency)
        if emerged_at is not None:
            keep &= self.emergence == index_of(emerged_at, self.snapshots, where="this index")
        if kind is not None:
            if kind not in evolution.KINDS:
                raise CrossjaxError(f"kind={kind!r} is not one of {list(evolution.KINDS)}.")
            keep &= self.kinds == kind
        return np.flatnonzero(keep)

    def features_for_row(self, row: int, k: int = 10) -> list[tuple[int, float]]:
        """The (feature, activation) pairs active on store row ``row``, largest first, at most ``k``."""
        k = index_build.integer_arg("features_for_row", "k", k, low=1)
        store = self._get_store()
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < store.meta.num_rows:
            raise CrossjaxError(f"row {row!r} is out of range: the store has rows 0..{store.meta.num_rows - 1}.")
        params, scales, cfg = self._get_export()
        if cfg.activation == "batchtopk":
            # BatchTopK depends on the batch: evaluate the row inside its batch of the build scan
            b = int(self.info["batch_rows"])
            a0 = row // b * b
            end = self.rows_scanned if row < self.rows_scanned else store.meta.num_rows
            acts = index_build.read_columns(store, a0, min(a0 + b, end), self.info.get("store_columns"))
            a = np.asarray(index_pass.row_values(params, acts, scales, cfg=cfg))[row - a0]
        else:
            acts = index_build.read_columns(store, row, row + 1, self.info.get("store_columns"))
            a = np.asarray(index_pass.row_values(params, acts, scales, cfg=cfg))[0]
        active = np.flatnonzero(a > 0)
        order = active[np.lexsort((active, -a[active]))][:k]
        return [(int(f), float(a[f])) for f in order]

    # ---- over the run ----------------------------------------------------------------------------------

    def table(self, workdir: str | os.PathLike | None = None):
        """A pandas DataFrame of every feature: kind, emergence, cluster, frequency, separability
        (crossjax/analysis/feature_table.py). workdir: the run's (default: the one the index was built from)."""
        from crossjax.analysis import feature_table
        return feature_table.table(self, workdir)

    def run(self, text: str | Sequence[int], *, features: Sequence[int] | None = None,
            workdir: str | os.PathLike | None = None, contexts_per_batch: int = 8, batch_rows: int = 1024,
            progress: bool = True):
        """Which features fire on which token of new ``text`` (or token ids) at each snapshot: the run's
        tokenizer, every snapshot to the hook, the crosscoder (crossjax/analysis/new_text.py). Returns a
        TextActivations: ``.frame`` (pandas DataFrame), ``print()`` shows the top features per token."""
        from crossjax.analysis import new_text
        return new_text.run(text, export=self._get_export(), snapshots=self.snapshots, info=self.info,
                            workdir=workdir, features=features, contexts_per_batch=contexts_per_batch,
                            batch_rows=batch_rows, progress=progress)

    def __repr__(self) -> str:
        return (f"FeatureIndex(features={self.num_features}, snapshots={len(self.snapshots)}, "
                f"rows_scanned={self.rows_scanned}, top_k={self.top_k})")
