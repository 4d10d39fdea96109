"""Throughput of the data pipeline: rows/s and MB/s of global jax.Array batches, and the memory it holds.

Writes a random activation store in a temporary directory (or --dir), then iterates
crossjax.data.make_loader over it: after --warmup batches, times --batches batches, each converted to a
jax.Array on a 'data' mesh over all local devices and waited for. A thread samples the process RSS every
5 ms; the peak growth over the RSS before the loader was built is reported. Prints one JSON object.

    python bench/loader.py                       # S=8, D=512, 65536 rows, global batch 4096, fp16
    python bench/loader.py --rows 131072 --step-ms 50   # with a simulated 50 ms training step
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

from _rss import PeakRss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536, help="rows N in the store")
    p.add_argument("--snapshots", type=int, default=8, help="snapshots S")
    p.add_argument("--d-model", type=int, default=512, help="d_model D")
    p.add_argument("--block-rows", type=int, default=4096, help="rows per store block R")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--batch", type=int, default=4096, help="global batch B")
    p.add_argument("--window-blocks", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=2, help="batches assembled ahead")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batches", type=int, default=40, help="timed batches (they may span several epochs)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step between batches")
    p.add_argument("--cpu-devices", type=int, default=0, help="if >0, simulate this many CPU devices")
    p.add_argument("--dir", default="", help="store location (kept); default: a temporary directory, removed")
    return p.parse_args()


def write_store(url: str, args):
    import numpy as np

    from crossjax.store import ActivationStore, StoreMeta

    meta = StoreMeta(snapshots=tuple(f"step{i}" for i in range(args.snapshots)), d_model=args.d_model,
                     num_rows=args.rows, block_rows=args.block_rows, dtype=args.dtype, model="bench", hook="bench")
    store = ActivationStore.create(url, meta)
    rng = np.random.default_rng(0)
    for b in range(meta.num_blocks):
        start, stop = store.block_range(b)
        for s in range(args.snapshots):
            if not store.is_done(b, s):
                store.write_block(b, s, rng.standard_normal((stop - start, args.d_model), np.float32))
        if not store.is_done(b):
            rows = np.arange(start, stop)
            store.write_tokens(b, rows % 50000, rows // 2048, rows % 2048)
    return store


def main():
    args = parse_args()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from crossjax.data import make_loader

    tmp = None if args.dir else tempfile.mkdtemp(prefix="crossjax-bench-")
    url = args.dir or os.path.join(tmp, "store")
    try:
        t0 = time.perf_counter()
        store = write_store(url, args)
        write_s = time.perf_counter() - t0
        # Baseline: the store's own read speed, whole windows in storage order, no shuffle or device transfer.
        t0 = time.perf_counter()
        for start in range(0, store.meta.num_blocks, args.window_blocks):
            store.read_blocks(range(start, min(start + args.window_blocks, store.meta.num_blocks)))
        read_s = time.perf_counter() - t0
        devices = jax.local_devices()
        mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)
        sharding = NamedSharding(mesh, P("data", None, None))

        import psutil

        rss_before = psutil.Process().memory_info().rss
        with PeakRss() as rss:
            loader = make_loader(store, global_batch=args.batch, seed=0, sharding=sharding,
                                 window_blocks=args.window_blocks, prefetch=args.prefetch)
            t_first = time.perf_counter()
            for _ in range(args.warmup):
                jax.block_until_ready(next(loader)["acts"])
                time.sleep(args.step_ms / 1000)
            warm_s = time.perf_counter() - t_first
            waits = []
            t0 = time.perf_counter()
            for _ in range(args.batches):
                t = time.perf_counter()
                x = next(loader)["acts"]
                jax.block_until_ready(x)
                waits.append(time.perf_counter() - t)
                time.sleep(args.step_ms / 1000)
            elapsed = time.perf_counter() - t0
            assert x.shape == (args.batch, args.snapshots, args.d_model) and x.sharding == sharding
            loader.close()
        rows = args.batch * args.batches
        row_bytes = args.snapshots * args.d_model * np.dtype(x.dtype).itemsize
        window_bytes = args.window_blocks * args.block_rows * row_bytes
        print(json.dumps({
            "bench": "loader",
            "rows": args.rows, "snapshots": args.snapshots, "d_model": args.d_model, "block_rows": args.block_rows,
            "dtype": args.dtype, "global_batch": args.batch, "window_blocks": args.window_blocks,
            "prefetch": args.prefetch, "step_ms": args.step_ms, "devices": len(devices),
            "batches_per_epoch": loader.batches_per_epoch, "timed_batches": args.batches,
            "store_write_s": round(write_s, 2), "warmup_s": round(warm_s, 3),
            "store_read_mb_per_s": round(args.rows * row_bytes / read_s / 1e6, 1),
            "rows_per_s": round(rows / elapsed), "mb_per_s": round(rows * row_bytes / elapsed / 1e6, 1),
            "batch_wait_ms": {"mean": round(1e3 * float(np.mean(waits)), 2),
                              "p50": round(1e3 * float(np.median(waits)), 2),
                              "max": round(1e3 * float(np.max(waits)), 2)},
            "window_mb": round(window_bytes / 1e6, 1),
            "peak_rss_growth_mb": round((rss.peak - rss_before) / 1e6, 1),
        }))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
