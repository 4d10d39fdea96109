"""Paths that are local files or gs:// objects: the one place the workdir's small files are read and written.

    paths.write_text(paths.join(workdir, "summary.json"), text)   # local: temp + rename; gs://: one object upload
    paths.read_bytes(paths.join(workdir, "config.json"))         # FileNotFoundError when absent, as for a file

A location is local (a path, or file://...) or a Cloud Storage URL (gs://bucket/prefix). Any other scheme is
refused by name (`check_supported`), and a local-only operation on gs:// (`require_local`) raises a
CrossjaxError naming the setting, never falling back to a local file: os.path would turn gs://b/run into a
directory literally named "gs:" under the current one.

On gs:// a "directory" is a key prefix: makedirs does nothing, a directory exists when an object lies under it,
and each write replaces one whole object, which Cloud Storage makes visible atomically. The objects are read
and written through tensorstore's gcs kvstore (the store's own client: same credentials, same
TENSORSTORE_GCS_HTTP_URL endpoint setting), whose generation preconditions the gs:// locks rest on.
"""
from __future__ import annotations

import os
import posixpath
import re
import threading
from typing import Callable

from crossjax.errors import CrossjaxError

GCS = "gs://"
# a local path with a component "gs:" (or another scheme) is a URL whose "//" was lost, e.g. by pathlib.Path
_MANGLED_URL = re.compile(r"(^|/)(gs|s3|gcs|az|hf|memory|file|https?):(/|$)")


def is_gcs(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(GCS)


def is_local(path: str | os.PathLike) -> bool:
    """A local path or a file:// URL."""
    path = os.fspath(path)
    return "://" not in path or path.startswith("file://")


def check_supported(path: str | os.PathLike, setting: str) -> str:
    """`path` itself when it is local or gs://; CrossjaxError naming `setting` (e.g. "--workdir") otherwise."""
    path = os.fspath(path)
    if not (is_local(path) or is_gcs(path)):
        scheme = path.split("://", 1)[0]
        raise CrossjaxError(f"{setting}={path}: {scheme}:// is not supported here; give a local directory or a "
                            "Cloud Storage location gs://bucket/path")
    if is_gcs(path):
        _split(path)  # a bucket must be named
    return path


def require_local(path: str | os.PathLike, what: str) -> str:
    """The local path of `path`; CrossjaxError when it is remote (`what` needs a local file system) or a URL
    whose "//" was lost (a directory named "gs:" would be made here instead of writing to the bucket)."""
    path = os.fspath(path)
    if not is_local(path):
        raise CrossjaxError(f"{what} needs a local path, and {path} is not one: it is not copied to a local file "
                            "behind your back. Give a local path for it.")
    path = path[len("file://"):] if path.startswith("file://") else path
    if _MANGLED_URL.search(path):
        raise CrossjaxError(f"{path} looks like a URL whose '//' was lost (pathlib.Path('gs://b/x') becomes "
                            "'gs:/b/x'): nothing was written, as it would make a local directory named after the "
                            "scheme. Pass the location as a string, e.g. gs://bucket/path.")
    return path


def absolute(path: str | os.PathLike) -> str:
    """Local paths made absolute; gs:// URLs as given, without a trailing slash (never os.path.abspath'd)."""
    path = os.fspath(path)
    if is_gcs(path):
        bucket, key = _split(path)
        return f"{GCS}{bucket}/{key}".rstrip("/")
    return os.path.abspath(require_local(path, "this location"))


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_gcs(base) else os.path.join(base, *parts)


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing


def exists(path: str | os.PathLike) -> bool:
    """A file or directory at `path` (on gs://: an object named `path`, or any object under `path/`)."""
    path = os.fspath(path)
    if not is_gcs(path):
        return os.path.exists(require_local(path, "this location"))
    return _object_exists(path) or isdir(path)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_gcs(path):
        return os.path.isdir(path)
    return bool(_list_keys(path.rstrip("/") + "/", limit_one=True))


def isfile(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _object_exists(path) if is_gcs(path) else os.path.isfile(path)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file or object; FileNotFoundError when there is none."""
    path = os.fspath(path)
    if not is_gcs(path):
        with open(require_local(path, "this location"), "rb") as f:
            return f.read()
    result = read_versioned(path)
    if result is None:
        raise FileNotFoundError(2, "No such object", path)
    return result[0]


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` so that a reader, or a process killed mid-write, sees the old or the new
    content, never part of it (local: a temporary file renamed over it; gs://: one object upload)."""
    path = os.fspath(path)
    if is_gcs(path):
        bucket, key = _split(path)
        _kvstore(bucket).write(key, bytes(data)).result()
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    write_via_local_file(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_via_local_file(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp) with a local temporary path, then put the result at `path` in one step (local: a rename
    beside it; gs://: one upload of the file's bytes). The temporary file never outlives the call."""
    path = os.fspath(path)
    if is_gcs(path):
        import tempfile
        fd, tmp = tempfile.mkstemp(prefix="crossjax-upload-")
        os.close(fd)
    else:
        path = require_local(path, "this location")
        tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        if is_gcs(path):
            with open(tmp, "rb") as f:
                write_bytes(path, f.read())
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove(path: str | os.PathLike) -> None:
    """Delete one file or object; FileNotFoundError when there is none."""
    path = os.fspath(path)
    if not is_gcs(path):
        os.remove(path)
        return
    if not _object_exists(path):
        raise FileNotFoundError(2, "No such object", path)
    bucket, key = _split(path)
    _kvstore(bucket).write(key, None).result()


def makedirs(path: str | os.PathLike) -> None:
    """Create a local directory and its parents (exist_ok); nothing to do on gs://, where prefixes need no
    creating."""
    path = os.fspath(path)
    if not is_gcs(path):
        os.makedirs(require_local(path, "this location"), exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """The names directly under a directory (on gs://: the first component of every key under `path/`), sorted."""
    path = os.fspath(path)
    if not is_gcs(path):
        return sorted(os.listdir(path))
    prefix = path.rstrip("/") + "/"
    return sorted({k.split("/", 1)[0] for k in _list_keys(prefix)})


def list_files(path: str | os.PathLike) -> list[str]:
    """Every file under a directory, as paths relative to it with '/' between parts (on gs://: every object
    under `path/`), sorted."""
    path = os.fspath(path)
    if is_gcs(path):
        return sorted(_list_keys(path.rstrip("/") + "/"))
    out = []
    for d, _, files in os.walk(require_local(path, "this location")):
        rel = os.path.relpath(d, path)
        out += [f if rel == "." else posixpath.join(rel.replace(os.sep, "/"), f) for f in files]
    return sorted(out)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a file or directory tree. Local: one rename. gs://: each object copied, then deleted (Cloud Storage
    has no rename; a move cut short leaves objects at both places, and running it again completes it)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if is_gcs(src) != is_gcs(dst):
        raise CrossjaxError(f"cannot move {src} to {dst}: both must be local or both on gs://")
    if not is_gcs(src):
        os.rename(src, dst)
        return
    names = [""] if _object_exists(src) else list_files(src)
    for name in names:
        a, b = (src, dst) if not name else (join(src, name), join(dst, name))
        write_bytes(b, read_bytes(a))
    for name in names:
        remove(src if not name else join(src, name))


# ----------------------------------------------------------------------------------------------------------------
# Objects with generations (the gs:// locks)


def read_versioned(url: str) -> tuple[bytes, bytes] | None:
    """(bytes, generation) of the object at gs:// `url`, None when there is none."""
    bucket, key = _split(url)
    r = _kvstore(bucket).read(key).result()
    return (r.value, r.stamp.generation) if r.state == "value" else None


def write_if(url: str, data: bytes | None, generation: bytes | None) -> bytes | None:
    """Write (or with data None, delete) the object at gs:// `url` only if its generation is still `generation`
    (None: only if there is no object). The new generation, or None when the precondition failed."""
    bucket, key = _split(url)
    stamp = _kvstore(bucket).write(key, data, if_equal=_NO_VALUE if generation is None else generation).result()
    return stamp.generation or None


_NO_VALUE = b"\x02"  # tensorstore's StorageGeneration::NoValue(): the condition "the key has no value"


# ----------------------------------------------------------------------------------------------------------------
# The gcs kvstore


_stores: dict[str, object] = {}
_stores_lock = threading.Lock()


def _split(url: str) -> tuple[str, str]:
    """(bucket, key) of gs://bucket/key."""
    rest = url[len(GCS):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CrossjaxError(f"{url} names no bucket: write gs://bucket/path")
    return bucket, key.lstrip("/")


def _kvstore(bucket: str):
    import tensorstore as ts
    with _stores_lock:
        if bucket not in _stores:
            try:
                _stores[bucket] = ts.KvStore.open({"driver": "gcs", "bucket": bucket}).result()
            except ValueError as e:
                raise CrossjaxError(f"cannot open the Cloud Storage bucket gs://{bucket} ({e}): check the bucket "
                                    "name and your credentials (gcloud auth application-default login)") from e
        return _stores[bucket]


def _object_exists(url: str) -> bool:
    bucket, key = _split(url)
    return bool(key) and _kvstore(bucket).read(key).result().state == "value"


def _list_keys(prefix_url: str, limit_one: bool = False) -> list[str]:
    """Keys under gs:// `prefix_url` (ending in '/'), relative to it."""
    import tensorstore as ts
    bucket, prefix = _split(prefix_url)
    kv = _kvstore(bucket)
    keys = kv.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix)) if prefix else ts.KvStore.KeyRange()).result()
    out = [k.decode()[len(prefix):] for k in keys]
    return out[:1] if limit_one else out


def _prefix_end(prefix: str) -> str:
    """The least key greater than every key starting with `prefix` ('a/' -> 'a0')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
