"""The one FeatureIndex of a finished run, shared by its consumers (the report, complexity scoring).

    index = run_index("runs/tiny", rows=131072, top_k=10)     # workdir/index, reused or built and saved there

The index lives in `workdir/index` (a local directory, or a gs:// prefix for a workdir on Cloud Storage). It is reused when it was built from the run's current weights (the export's
hash), keeps at least `top_k` examples per feature and scanned at least `rows` rows (or the whole store when it
has fewer); otherwise it is built again (one streaming pass over the first `rows` rows of the run's store: its
rows are shuffled at write time, so that is a random sample), with at least the old one's rows and examples so
that it serves the old one's consumers too, and saved over it. An index that another
consumer built with more rows or examples serves a smaller request as it is: one pass per run, whoever asks first.
"""
from __future__ import annotations

import os

from crossjax import console, paths
from crossjax.errors import CrossjaxError

INDEX_DIR = "index"
DEFAULT_ROWS = 131072      # store rows scanned when a consumer asks for no particular number
DEFAULT_TOP_K = 10         # examples kept per feature
WINDOW = 8                 # tokens kept on each side of an example


def index_path(workdir: str | os.PathLike) -> str:
    return paths.join(paths.absolute(os.fspath(workdir)), INDEX_DIR)


def why_not_reused(index, *, rows: int, top_k: int) -> str | None:
    """None when `index` serves a request for `rows` scanned rows and `top_k` examples, else the reason."""
    store_rows = int(index.info.get("store_rows", index.rows_scanned))
    if index.top_k < top_k:
        return f"it keeps {index.top_k} examples per feature, {top_k} are asked for"
    if index.rows_scanned < min(rows, store_rows):
        return f"it scanned {index.rows_scanned} rows, {min(rows, store_rows)} are asked for"
    return None


def run_index(workdir: str | os.PathLike, *, export_dir: str | None = None, rows: int = DEFAULT_ROWS,
              top_k: int = DEFAULT_TOP_K, window: int = WINDOW, stage: str = "index", progress: bool = True):
    """The FeatureIndex of the run in `workdir` (module docstring); `export_dir` defaults to workdir/export.
    stage: the name progress lines are printed under. CrossjaxError when it must be built and cannot be (the
    run's store is gone, say)."""
    from crossjax.analysis.lookup import FeatureIndex

    workdir = paths.absolute(os.fspath(workdir))
    export_dir = export_dir or paths.join(workdir, "export")
    path = index_path(workdir)
    if paths.isdir(path):
        try:
            index = FeatureIndex.load(path)
            index.attach(export_dir=export_dir)          # refuses an index of other weights
            reason = why_not_reused(index, rows=rows, top_k=top_k)
            if reason is None:
                return index
            # the new one serves the old one's consumers too: no rebuilding back and forth between them
            rows, top_k = max(rows, index.rows_scanned), max(top_k, index.top_k)
            console.say(stage, f"rebuilding the feature index in {path}: {reason}", enabled=progress)
        except CrossjaxError as e:
            console.say(stage, f"rebuilding the feature index in {path} ({e})", enabled=progress)
    console.say(stage, f"feature index: top {top_k} rows of each feature over up to {rows} store rows (one pass)",
                enabled=progress)
    index = FeatureIndex.build(workdir, max_rows=rows, top_k=top_k, window=window, progress=progress)
    index.save(path)
    return index
