"""A FeatureIndex on disk or in a bucket: ``feature_index.npz`` (arrays) and ``feature_index.json`` (settings).

Written arrays first, each file whole (a temporary file renamed locally, one object upload on gs://), so a reader
that finds the settings finds the arrays they describe; written by process 0 only under jax.distributed.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np

from crossjax import paths
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write, atomic_write_text

INDEX_ARRAYS = "feature_index.npz"
INDEX_META = "feature_index.json"


def path_arg(where: str, path, *, url: bool = False):
    """A path argument (a string or os.PathLike; with `url`, the string itself: store URLs are not paths)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CrossjaxError(f"{where}: {path!r} is not a path; pass a directory{' or URL' if url else ''} as a "
                            "string.")
    return os.fspath(path) if url else Path(path)


def is_url(path) -> bool:
    """A gs:// location (read and written through crossjax.paths; pathlib would turn gs://b/x into gs:/b/x)."""
    return isinstance(path, (str, os.PathLike)) and paths.is_gcs(path)


def write_index(arrays: dict[str, np.ndarray], info: dict, path: str | os.PathLike) -> str:
    """Write the index files under `path` (a directory or a gs:// prefix); returns it."""
    def write_arrays(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)

    if is_url(path):
        url = paths.absolute(os.fspath(path))
        if jax.process_index() != 0:
            return url
        if paths.isfile(url):
            raise CrossjaxError(f"{url} is an object: FeatureIndex.save writes a prefix of two objects; choose "
                                "another path.")
        paths.write_via_local_file(paths.join(url, INDEX_ARRAYS), write_arrays)
        paths.write_text(paths.join(url, INDEX_META), json.dumps(info, indent=1) + "\n")
        return url
    p = path_arg("FeatureIndex.save", path)
    if jax.process_index() != 0:
        return str(p)
    if p.exists() and not p.is_dir():
        raise CrossjaxError(f"{p} is a file: FeatureIndex.save writes a directory; choose another path.")
    p.mkdir(parents=True, exist_ok=True)
    atomic_write(p / INDEX_ARRAYS, write_arrays)
    atomic_write_text(p / INDEX_META, json.dumps(info, indent=1) + "\n")
    return str(p)


def read_index(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, str]:
    """(arrays, settings, where) of the index files under `path`; CrossjaxError naming a missing or damaged file."""
    if is_url(path):
        where = paths.absolute(path)
        files = [paths.join(where, INDEX_ARRAYS), paths.join(where, INDEX_META)]
        isfile, read = paths.isfile, paths.read_bytes
    else:
        p = path_arg("FeatureIndex.load", path)
        where, files = str(p), [p / INDEX_ARRAYS, p / INDEX_META]
        isfile, read = (lambda f: f.is_file()), (lambda f: f.read_bytes())
    missing = [str(f) for f in files if not isfile(f)]
    if missing:
        raise CrossjaxError(f"{missing} not found: {where} is not a saved FeatureIndex (write one with "
                            "FeatureIndex.build(...).save(path)).")
    try:
        info = json.loads(read(files[1]).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossjaxError(f"{files[1]} is not valid JSON ({e}); rebuild the index: "
                            "FeatureIndex.build(...).save(path).") from None
    try:
        with np.load(io.BytesIO(read(files[0])), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise CrossjaxError(f"{files[0]} is damaged ({type(e).__name__}: {e}); rebuild the index: "
                            "FeatureIndex.build(...).save(path).") from None
    return arrays, info, where
