"""A run on gs:// as the index pass reads it: its export and small files staged in a local directory.

    with staged("gs://bucket/run") as local:        # local/export/, local/summary.json, local/config.json
        scan = index_build.scan(local, ...)
        restore_places(scan.info, "gs://bucket/run", local)

The pass locates the export, its summary and the store through local paths (crossjax/analysis/index_build.py);
the export is a few MB, so it is copied here rather than streamed. The store stays where summary.json says it is
(gs:// or local): only the export, summary.json and config.json are copied. summary.json's copy names the staged
directory as the run's workdir and export, so the pass finds the same summary beside the export as it would in the
bucket; `restore_places` then writes the gs:// locations back into the index's settings, so nothing in the saved
index points at the staging directory, which is removed on leaving the block.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from crossjax import crosscoder_export, paths
from crossjax.errors import CrossjaxError
from crossjax.summary import SUMMARY_FILE
from crossjax.workdir import CONFIG_FILE

EXPORT = "export"


def places(url: str) -> tuple[str, str]:
    """(workdir, export dir) of gs:// `url`, a training workdir (holding export/) or an export directory."""
    url = paths.absolute(url)
    if paths.isdir(paths.join(url, EXPORT)):
        return url, paths.join(url, EXPORT)
    if paths.isfile(paths.join(url, crosscoder_export.EXPORT_WEIGHTS)):
        return url.rsplit("/", 1)[0], url
    raise CrossjaxError(f"{url} is neither a crosscoder export ({crosscoder_export.EXPORT_CONFIG} + "
                        f"{crosscoder_export.EXPORT_WEIGHTS}) nor a workdir with export/: finish training first "
                        "(python -m crossjax.train) or point at the export directory.")


@contextlib.contextmanager
def staged(url: str):
    """A local directory laid out like the run at gs:// `url` (module docstring); yields the local path that
    stands for `url` (the staged workdir, or its export/ when `url` is an export directory)."""
    workdir, export = places(url)
    local = tempfile.mkdtemp(prefix="crossjax-run-")
    try:
        for name in paths.list_files(export):
            target = os.path.join(local, EXPORT, *name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(paths.read_bytes(paths.join(export, name)))
        for name in (SUMMARY_FILE, CONFIG_FILE):
            try:
                data = paths.read_bytes(paths.join(workdir, name))
            except FileNotFoundError:
                continue
            if name == SUMMARY_FILE:
                data = _summary_here(data, workdir, export, local)
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
        yield local if url.rstrip("/") == workdir else os.path.join(local, EXPORT)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _summary_here(data: bytes, workdir: str, export: str, local: str) -> bytes:
    """summary.json naming the staged directory where it named the run's gs:// workdir and export."""
    try:
        summary = json.loads(data)
    except ValueError:
        return data       # the pass reads it and names the damage
    if isinstance(summary, dict) and summary.get("export") in (export, export + "/"):
        summary["workdir"] = local
        summary["export"] = os.path.join(local, EXPORT)
    return json.dumps(summary).encode()


def restore_places(info: dict, url: str, local: str) -> None:
    """Point the index settings `info` at the run's gs:// workdir and export instead of the staging dir."""
    workdir, export = places(url)
    info["export_dir"] = export
    root = local if os.path.basename(local.rstrip(os.sep)) != EXPORT else os.path.dirname(local.rstrip(os.sep))
    if info.get("workdir") and os.path.realpath(info["workdir"]) == os.path.realpath(root):
        info["workdir"] = workdir
