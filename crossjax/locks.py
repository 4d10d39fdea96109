"""Locks between processes on local directories: one run per workdir, one writer per unit of a store.

    with locks.hold_workdir(workdir):                      # every process of a run calls it; process 0 locks
        ...
    with locks.claim_store_units(url, index=p, count=P, num_units=G, unit="group"):
        ...                                                # this process writes units u with u % P == p

Both rest on flock(2): the kernel releases a lock when its holder ends, however it ends (SIGKILL included), so a
lock file whose lock can be taken belongs to a process that has ended; it is taken over with a message. Each
lock file holds its holder's pid, host, start time and command, so the error names who holds it.

- workdir/.lock: process 0 of a run holds it while the run uses the workdir (checkpoints, metrics, export,
  summary); a run of several processes shares one workdir, and every run has a process 0, so its lock alone
  tells two runs apart. The other processes learn process 0's result through one collective, so that all of
  them stop together instead of waiting for each other.
- <store>/.writers/: each writer of a store publishes one locked file naming the units it writes
  (u % count == index, u < num_units). A second writer whose units overlap those of a live one stops before
  writing anything; the processes of one run (same count, distinct indices) never overlap.

On gs:// (no flock there) both locks are leases (crossjax/gcs_lease.py): an object created only if absent,
renewed by its holder every few seconds; one whose holder's pid is gone from this host, or that has not been
renewed for gcs_lease.STALE_AFTER_S, is taken over with a message. Other kvstores (memory://, s3://) are not
locked: the store's done markers still keep a finished unit from being written twice.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

import numpy as np

from crossjax import console, gcs_lease, paths
from crossjax.errors import CrossjaxError

WORKDIR_LOCK = ".lock"
WRITERS_DIR = ".writers"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock
_held_workdirs: dict[str, int] = {}  # realpath -> depth: a process may enter its own workdir lock again


class LockHeldError(CrossjaxError):
    """Another live process holds the lock (its pid and host are in the message)."""


# ----------------------------------------------------------------------------------------------------------------
# The lock file itself


def _holder() -> dict:
    command = " ".join([os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]])
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "started_ns": time.time_ns(), "command": command[:300]}


def _describe(info: dict | None) -> str:
    if not info:
        return "a process that has not yet written its name into the lock file"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')} ({info.get('command')})"


def _read_info(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _write_info(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _try_flock(fd: int) -> bool:
    """True when this process now holds the exclusive lock of fd, False when a live process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_path(path: str) -> tuple[int | None, dict | None]:
    """(fd holding the lock of `path`, created if missing, and the info a previous holder left there), or
    (None, the holder's info) when a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_flock(fd):
                info = _read_info(fd)
                os.close(fd)
                return None, info
            # a holder removes its file before it lets go: the file locked must still be the one at `path`
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                return fd, _read_info(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(path: str, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # before the lock goes, so that no one locks a file that is about to disappear
    os.close(fd)


def _unwritable(path: str, e: OSError, what: str) -> CrossjaxError:
    """`what` ("--workdir", "store.path"): the setting that chooses the location."""
    if e.errno == errno.EROFS:
        fix = f"the location is on a read-only file system; set {what} to a writable one"
    else:
        fix = f"make the location writable (fix its permissions, free space) or set {what} to another one"
    return CrossjaxError(f"cannot create the lock file {path} ({e.strerror}): {fix}")


# ----------------------------------------------------------------------------------------------------------------
# One run per workdir


@contextlib.contextmanager
def hold_workdir(workdir: str) -> Iterator[None]:
    """Hold workdir/.lock for the duration (process 0; the others wait for its result in one collective).

    LockHeldError when another run holds it; a lock left by a run that has ended is taken over with a message.
    The same process may enter the lock of a workdir it already holds (e.g. compare around its crosscoder run).
    """
    import jax

    key = paths.absolute(workdir) if paths.is_gcs(workdir) else os.path.realpath(workdir)
    if key in _held_workdirs:
        _held_workdirs[key] += 1
        try:
            yield
        finally:
            _held_workdirs[key] -= 1
        return
    path = paths.join(workdir, WORKDIR_LOCK)
    held, error = None, None  # held: the flock'd fd, or the gs:// lease
    if jax.process_index() == 0:
        try:
            held = _acquire_gcs_workdir(workdir, path) if paths.is_gcs(workdir) else _acquire_workdir(workdir, path)
        except Exception as e:  # the other processes must hear of it before this one stops
            error = e
    if jax.process_count() > 1 and not _all_processes_agree(error is None):
        _release_workdir(path, held)
        if error is None:
            raise CrossjaxError(f"process 0 of this run could not lock {workdir}: its message says why")
    if error is not None:
        raise error
    _held_workdirs[key] = 1
    try:
        yield
    finally:
        del _held_workdirs[key]
        _release_workdir(path, held)


def _release_workdir(path: str, held: int | gcs_lease.Lease | None) -> None:
    if isinstance(held, gcs_lease.Lease):
        held.release()
    elif held is not None:
        _release(path, held)


def _acquire_workdir(workdir: str, path: str) -> int | None:
    setting = "--workdir"
    try:
        fd, left = _lock_path(path)
    except OSError as e:
        if e.errno in _NO_FLOCK:
            console.say("workdir", f"{workdir} is on a file system without flock: a second run on it at the same "
                        "time would not be detected")
            return None
        raise _unwritable(path, e, setting) from e
    if fd is None:
        raise LockHeldError(
            f"{workdir} is in use by another run: {_describe(left)}. Two runs on one workdir would mix their "
            "checkpoints and metrics. Wait for that run to end (the same command then resumes or re-evaluates "
            f"it), stop it{_kill_hint(left)}, or give this run another --workdir.")
    if left:
        console.say("workdir", f"took over the lock of {workdir} from {_describe(left)}, which has ended")
    try:
        _write_info(fd, _holder())
    except OSError as e:
        _release(path, fd)
        raise _unwritable(path, e, setting) from e
    return fd


def _acquire_gcs_workdir(workdir: str, path: str) -> gcs_lease.Lease:
    lease, left, took_over = gcs_lease.acquire(path, _holder(), stage="workdir")
    if lease is None:
        raise LockHeldError(
            f"{workdir} is in use by another run: {_describe(left)}, which renewed its lock "
            f"{_age(left)}. Two runs on one workdir would mix their checkpoints and metrics. Wait for that run "
            f"to end (the same command then resumes or re-evaluates it), stop it{_kill_hint(left)} (its lock is "
            f"then taken over once it is {gcs_lease.STALE_AFTER_S:.0f} s old, at once on its own host), or give "
            "this run another --workdir.")
    if took_over:
        console.say("workdir", f"took over the lock of {workdir} from {_describe(left)}, which has ended")
    return lease


def _age(info: dict | None) -> str:
    beat = (info or {}).get("heartbeat_ns")
    return f"{(time.time_ns() - beat) / 1e9:.0f} s ago" if isinstance(beat, int) else "at an unknown time"


def _kill_hint(info: dict | None) -> str:
    return f" (kill {info['pid']} on {info['host']})" if info and "pid" in info and "host" in info else ""


def _all_processes_agree(ok: bool) -> bool:
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


# ----------------------------------------------------------------------------------------------------------------
# One writer per unit of a store


def local_directory(url: str) -> str | None:
    """The local directory of a store URL (a path or file://...), None for other kvstores."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _overlap(a: dict, index: int, count: int, num_units: int) -> bool:
    try:
        other_index, other_count = int(a["index"]), int(a["count"])
    except (KeyError, TypeError, ValueError):
        return True  # a claim that does not say what it writes: assume the worst
    if int(a.get("num_units", num_units)) != num_units:
        return True
    u = np.arange(num_units)
    return bool(np.any((u % count == index) & (u % other_count == other_index)))


@contextlib.contextmanager
def claim_store_units(url: str, *, index: int, count: int, num_units: int, unit: str,
                      stage: str = "activations") -> Iterator[None]:
    """Publish that this process writes the units u < num_units with u % count == index of the store at url,
    for the duration; LockHeldError, before anything is written, when a live writer's units overlap them.

    unit: what a unit is ("group of blocks", "block"), for the messages. A claim left by a writer that has
    ended is removed with a message (its unfinished units have no done marker and are written again).
    """
    directory = local_directory(url)
    me = _holder() | {"index": int(index), "count": int(count), "num_units": int(num_units)}
    name = f"{me['host']}-{me['pid']}-{me['started_ns']}"
    if directory is None:
        if paths.is_gcs(url):
            with _claim_gcs_units(url, me, name, unit, stage):
                yield
        else:
            yield
        return
    writers = os.path.join(directory, WRITERS_DIR)
    path = os.path.join(writers, name)
    setting = "store.path"
    try:
        os.makedirs(writers, exist_ok=True)
        fd = _publish(writers, name, me)
    except OSError as e:
        if e.errno in _NO_FLOCK:
            console.say(stage, f"{directory} is on a file system without flock: another writer of the same units "
                        "would not be detected")
            yield
            return
        raise _unwritable(path, e, setting) from e
    try:
        _check_other_writers(writers, name, me, url, unit, stage)
        yield
    finally:
        _release(path, fd)


def _publish(writers: str, name: str, info: dict) -> int:
    """Create writers/name already locked and filled in (written under a temporary name, then renamed), so
    that a file found under a final name without a lock always belongs to a writer that has ended."""
    tmp = os.path.join(writers, f".tmp-{name}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_info(fd, info)
        os.rename(tmp, os.path.join(writers, name))
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return fd


def _check_other_writers(writers: str, name: str, me: dict, url: str, unit: str, stage: str) -> None:
    for other in sorted(os.listdir(writers)):
        if other == name or other.startswith(".tmp-"):
            continue
        path = os.path.join(writers, other)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # that writer has just finished
        try:
            info = _read_info(fd)
            if _try_flock(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                console.say(stage, f"removed the claim of a writer of {url} that has ended: {_describe(info)}; "
                            f"its unfinished {unit}s are written again")
                continue
        finally:
            os.close(fd)
        if _overlap(info or {}, me["index"], me["count"], me["num_units"]):
            raise _overlap_error(info, me, url, unit)


def _overlap_error(info: dict | None, me: dict, url: str, unit: str) -> LockHeldError:
    theirs = (f"{unit}s u with u % {info['count']} == {info['index']}" if info and "count" in info
              else "unknown units")
    return LockHeldError(
        f"another writer is writing {url}: {_describe(info)}, writing {theirs}, which overlap the {unit}s "
        f"this process would write (u % {me['count']} == {me['index']}). Wait for it to end, then run the "
        f"same command again: it writes only the units still missing. To write another store at the same "
        f"time, set store.path to another location.")


@contextlib.contextmanager
def _claim_gcs_units(url: str, me: dict, name: str, unit: str, stage: str) -> Iterator[None]:
    """claim_store_units on gs://: the claim is a lease object <store>/.writers/<name>."""
    writers = paths.join(url.rstrip("/"), WRITERS_DIR)
    lease, _, _ = gcs_lease.acquire(paths.join(writers, name), me, stage)
    try:
        for other in paths.listdir(writers):
            held = None if other == name else gcs_lease.read_holder(paths.join(writers, other))
            if held is None:
                continue  # this claim, or a writer that has just finished
            info, generation = held
            if gcs_lease.ended(info):
                paths.write_if(paths.join(writers, other), None, generation)
                console.say(stage, f"removed the claim of a writer of {url} that has ended: {_describe(info)}; "
                            f"its unfinished {unit}s are written again")
            elif _overlap(info or {}, me["index"], me["count"], me["num_units"]):
                raise _overlap_error(info, me, url, unit)
        yield
    finally:
        lease.release()
