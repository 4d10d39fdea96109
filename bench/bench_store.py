"""Activation store throughput: planted generation (write) and block reads, as JSON.

    python bench/bench_store.py [--rows 32768] [--d_model 128] [--snapshots 8] [--block_rows 4096]

Prints one JSON object: write MB/s (generation included), read MB/s for read_blocks over a shuffled window of
blocks and for read_rows over the whole store.
"""
import argparse
import json
import os
import tempfile
import time

import numpy as np

from crossjax import configs, planted
from crossjax.store import ActivationStore


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--snapshots", type=int, default=8)
    p.add_argument("--block_rows", type=int, default=4096)
    p.add_argument("--window_blocks", type=int, default=4)
    a = p.parse_args()
    cfg = configs.planted_config()
    cfg.update(num_rows=a.rows, d_model=a.d_model, num_snapshots=a.snapshots, block_rows=a.block_rows,
               num_features=2 * a.d_model)
    mb = a.rows * a.snapshots * a.d_model * 2 / 1e6
    with tempfile.TemporaryDirectory() as d:
        url = os.path.join(d, "store")
        t0 = time.perf_counter()
        planted.generate_planted(url, cfg)
        t_write = time.perf_counter() - t0
        st = ActivationStore.open(url)
        blocks = np.random.default_rng(0).permutation(st.num_blocks)
        st.read_blocks(blocks[:1])  # warm-up
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(blocks), a.window_blocks):
            n += st.read_blocks(blocks[i : i + a.window_blocks]).nbytes
        t_blocks = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.read_rows(0, a.rows)
        t_rows = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(url) for f in fs) / 1e6
    print(json.dumps({
        "rows": a.rows, "snapshots": a.snapshots, "d_model": a.d_model, "block_rows": a.block_rows,
        "raw_mb": round(mb, 1), "on_disk_mb": round(disk, 1),
        "write_mb_s_incl_generation": round(mb / t_write, 1),
        "read_blocks_mb_s": round(n / 1e6 / t_blocks, 1),
        "read_rows_mb_s": round(mb / t_rows, 1),
    }))


if __name__ == "__main__":
    main()
