"""Locks on gs:// (the local GCS emulator), where there is no flock: a second run on a workdir in use is refused
naming the first; the lease of a SIGKILLed holder on this host is taken over at once, another host's only once
it is stale; a holder renews its lease; overlapping store writers are refused."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from _gcs_util import wait_for
from _procs import child_env, reaped, sigkill
from crossjax import gcs_lease, locks, paths

HOLDER = ("import sys, time\nfrom crossjax import locks\n"
          "with locks.hold_workdir(sys.argv[1]):\n"
          "    print('held', flush=True)\n"
          "    time.sleep(120)\n")


def _plant(url, host, age_s, **extra):
    info = {"pid": 1, "host": host, "started": "earlier", "command": "train", "heartbeat_ns":
            time.time_ns() - int(age_s * 1e9), **extra}
    paths.write_bytes(url, json.dumps(info).encode())


def test_second_run_refused_then_sigkilled_holder_taken_over(gcs_emulator, gcs_url, capfd):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, gcs_url], stdout=subprocess.PIPE, text=True,
                            env=child_env(1, **gcs_emulator["env"]))
    with reaped(proc):
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(locks.LockHeldError, match=rf"in use by another run: pid {proc.pid} on host"):
            with locks.hold_workdir(gcs_url):
                pass
        sigkill(proc)
    assert paths.isfile(gcs_url + "/.lock")  # the killed holder could not remove it
    with locks.hold_workdir(gcs_url):
        assert json.loads(paths.read_bytes(gcs_url + "/.lock"))["pid"] == os.getpid()
    assert f"took over the lock of {gcs_url} from pid {proc.pid}" in capfd.readouterr().err
    assert not paths.isfile(gcs_url + "/.lock")  # released


def test_another_hosts_lease_is_taken_over_only_once_stale(gcs_url, capfd):
    lock = gcs_url + "/.lock"
    _plant(lock, "other-host", age_s=5)
    with pytest.raises(locks.LockHeldError, match="pid 1 on host other-host.*renewed its lock 5 s ago"):
        with locks.hold_workdir(gcs_url):
            pass
    _plant(lock, "other-host", age_s=gcs_lease.STALE_AFTER_S + 10)
    with locks.hold_workdir(gcs_url):
        pass
    assert "took over the lock" in capfd.readouterr().err


def test_a_holder_renews_its_lease_and_releases_it(gcs_url, monkeypatch):
    monkeypatch.setattr(gcs_lease, "HEARTBEAT_S", 0.05)
    lock = gcs_url + "/.lock"
    with locks.hold_workdir(gcs_url):
        first = json.loads(paths.read_bytes(lock))["heartbeat_ns"]
        wait_for(lambda: json.loads(paths.read_bytes(lock))["heartbeat_ns"] > first, 10, "a renewed lease")
    assert not paths.isfile(lock)


def test_two_racing_takers_one_wins(gcs_url):
    lock = gcs_url + "/.lock"
    a, _, _ = gcs_lease.acquire(lock, {"pid": os.getpid(), "host": socket.gethostname()}, "test")
    b, holder, _ = gcs_lease.acquire(lock, {"pid": os.getpid() + 1, "host": socket.gethostname()}, "test")
    try:
        assert a is not None and b is None and holder["pid"] == os.getpid()
    finally:
        a.release()


def test_overlapping_store_writers_on_gcs_are_refused(gcs_url, capfd):
    store = gcs_url + "/store"
    _plant(store + "/.writers/other-host-1-0", "other-host", age_s=1, index=0, count=2, num_units=6)
    with pytest.raises(locks.LockHeldError, match="another writer is writing .*u % 2 == 0"):
        with locks.claim_store_units(store, index=0, count=1, num_units=6, unit="block"):
            pass
    assert paths.listdir(store + "/.writers") == ["other-host-1-0"]  # the refused claim is gone
    with locks.claim_store_units(store, index=1, count=2, num_units=6, unit="block"):  # disjoint units
        pass
    _plant(store + "/.writers/other-host-1-0", "other-host", age_s=gcs_lease.STALE_AFTER_S + 1, index=0, count=2,
           num_units=6)
    with locks.claim_store_units(store, index=0, count=1, num_units=6, unit="block"):
        pass
    assert "removed the claim of a writer" in capfd.readouterr().err
    assert not paths.isdir(store + "/.writers")
