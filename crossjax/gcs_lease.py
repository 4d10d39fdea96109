"""Locks on Cloud Storage, where there is no flock: a lease object created only if absent and kept fresh.

    lease, left, took_over = gcs_lease.acquire("gs://bucket/run/.lock", holder_info, stage)
    ...
    lease.release()

- Taking: the object is written with the precondition "no object yet" (ifGenerationMatch=0), so of two
  processes racing, exactly one wins; taking over an ended holder's lease is a write conditional on the
  generation read, so again one wins.
- Holding: a daemon thread rewrites the object every HEARTBEAT_S seconds (conditional on the generation it
  last wrote) with the time in `heartbeat_ns`. If that condition fails, another process has taken the lease
  (this one stalled past STALE_AFTER_S): it is said at once, and renewing stops.
- Ended holders: the kernel does not release a lease when its holder dies, so a lease counts as ended when its
  holder ran on this host and its pid is gone (a SIGKILLed run resumed on the same machine takes over at once),
  or when its heartbeat is older than STALE_AFTER_S (a holder on another host: by the clocks of the two hosts,
  which NTP keeps within well under a second of each other on cloud VMs).
- Releasing deletes the object only if it is still this holder's (conditional on its generation).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from crossjax import console, paths
from crossjax.errors import CrossjaxError

HEARTBEAT_S = 15.0     # how often a holder renews its lease
STALE_AFTER_S = 120.0  # a lease not renewed for this long belongs to a holder that has ended
_ATTEMPTS = 8          # races lost in a row before giving up (each loss means another process just wrote)


class Lease:
    """A lease held by this process on the gs:// object `url`; renewed until release()."""

    def __init__(self, url: str, generation: bytes, info: dict, stage: str):
        self.url = url
        self.info = info
        self._generation = generation
        self._stage = stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {url}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                generation = paths.write_if(self.url, _body(self.info), self._generation)
            except Exception as e:  # a transient error: the next beat tries again, well before the lease is stale
                console.say(self._stage, f"could not renew the lock {self.url} ({e}); trying again")
                continue
            if generation is None:
                console.say(self._stage, f"the lock {self.url} was taken over by another process after this one "
                            f"did not renew it for {STALE_AFTER_S:.0f} s: both may now write the same location. "
                            "Stop one of them.")
                return
            self._generation = generation

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        paths.write_if(self.url, None, self._generation)  # only if still ours


def acquire(url: str, info: dict, stage: str) -> tuple[Lease | None, dict | None, bool]:
    """(the lease, the info an ended holder left there, whether one had) when taken; (None, the live holder's
    info, False) when a live process holds it."""
    for _ in range(_ATTEMPTS):
        found = paths.read_versioned(url)
        left, generation = (None, None) if found is None else (_parse(found[0]), found[1])
        if found is not None and not ended(left):
            return None, left, False
        taken = paths.write_if(url, _body(info), generation)
        if taken is not None:
            return Lease(url, taken, info, stage), left, found is not None
    raise CrossjaxError(f"could not take the lock {url}: it changed {_ATTEMPTS} times while this process tried "
                        "(other processes are taking it); run again once they have started")


def ended(info: dict | None) -> bool:
    """Whether the holder that wrote `info` has ended (see the module docstring)."""
    if not info:
        return True  # crossjax writes whole JSON objects: anything else is not a live holder's
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
        return True
    beat = info.get("heartbeat_ns")
    return not isinstance(beat, int) or time.time_ns() - beat > STALE_AFTER_S * 1e9


def read_holder(url: str) -> tuple[dict | None, bytes] | None:
    """(the info in the lease object at `url`, its generation), None when there is none."""
    found = paths.read_versioned(url)
    return None if found is None else (_parse(found[0]), found[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _body(info: dict) -> bytes:
    return (json.dumps({**info, "heartbeat_ns": time.time_ns()}) + "\n").encode()


def _parse(data: bytes) -> dict | None:
    try:
        info = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None
