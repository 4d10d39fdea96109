"""Writes a small test store unit by unit in its own process; used by tests/data/test_store.py.

usage: python _store_writer_proc.py URL PROCESS_INDEX PROCESS_COUNT [--die-before-marker K] [--sleep SECONDS]

Prints "unit BLOCK SNAPSHOT" after each finished unit. With --die-before-marker K the process SIGKILLs
itself after writing the data of its K-th unit (counting from 0) but before that unit's done marker.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np

from crossjax import store as store_lib

META = store_lib.StoreMeta(
    snapshots=("step0", "step1", "step2"), d_model=8, num_rows=45, block_rows=8, dtype="float16",
    model="test", hook="blocks.0.hook_resid_post", context_len=9,
)


def unit_acts(block: int, snapshot: int, rows: int) -> np.ndarray:
    """The activations of one unit, a pure function of (block, snapshot)."""
    rng = np.random.default_rng([block, snapshot])
    return (rng.standard_normal((rows, META.d_model)) * (snapshot + 1)).astype(np.float32)


def unit_tokens(block: int, start: int, stop: int):
    rows = np.arange(start, stop)
    rng = np.random.default_rng([block, 1000])
    return rng.integers(0, 50_000, stop - start), rows // 9, rows % 9


def write(url: str, process_index: int, process_count: int, die_before_marker: int = -1, sleep: float = 0.0):
    st = store_lib.ActivationStore.create(url, META)
    if die_before_marker >= 0:
        count = [0]
        real_mark = st._mark

        def mark(block, snapshot):
            if count[0] == die_before_marker:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            real_mark(block, snapshot)

        st._mark = mark
    for block, snapshot in st.missing_units():
        if block % process_count != process_index:
            continue
        start, stop = st.block_range(block)
        if snapshot is None:
            st.write_tokens(block, *unit_tokens(block, start, stop))
        else:
            st.write_block(block, snapshot, unit_acts(block, snapshot, stop - start))
        print(f"unit {block} {snapshot}", flush=True)
        if sleep:
            time.sleep(sleep)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("process_index", type=int)
    p.add_argument("process_count", type=int)
    p.add_argument("--die-before-marker", type=int, default=-1)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args()
    write(a.url, a.process_index, a.process_count, a.die_before_marker, a.sleep)
    sys.exit(0)
