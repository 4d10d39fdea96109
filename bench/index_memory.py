"""Memory of FeatureIndex.build as the store grows: the peak RSS growth of one index pass over two store sizes.

Writes two random activation stores (--base-rows times --small and --large rows) and a random crosscoder export
in a temporary directory, then builds the index over each in a fresh process: after a warm-up build over the
first two batches (so compilation is not counted), a thread samples the process RSS every 5 ms during the full
build; its peak over the RSS before the build is the growth. The pass keeps per-feature statistics (counts,
top-k rows with their per-snapshot gates, histograms) whose size does not depend on the store's rows, so the two
growths should agree (the token pass that collects context windows reads at most 2^20 rows of tokens at a time,
12 bytes each). Prints one JSON object.

    python bench/index_memory.py                        # 2x and 8x of 16384 rows, S=4, D=64, F=1024
    python bench/index_memory.py --features 4096 --large 16
    python bench/index_memory.py --processes 2            # two processes joined by jax.distributed on localhost

With --processes P, every process reads its 1/P of the rows and holds the whole per-feature state (merged
exactly at the end, crossjax/analysis/index_merge.py): figures per process, the largest growth reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from _rss import PeakRss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-rows", type=int, default=16384)
    p.add_argument("--small", type=int, default=2, help="the small store holds this many times --base-rows")
    p.add_argument("--large", type=int, default=8, help="the large store holds this many times --base-rows")
    p.add_argument("--snapshots", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--activation", default="jumprelu", choices=["jumprelu", "relu", "topk", "batchtopk"])
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--batch-rows", type=int, default=2048)
    p.add_argument("--block-rows", type=int, default=4096)
    p.add_argument("--histogram-bins", type=int, default=32)
    p.add_argument("--processes", type=int, default=1,
                   help="build with this many processes joined by jax.distributed on localhost, each reading its "
                        "share of the rows (figures per process)")
    p.add_argument("--child", nargs=2, metavar=("EXPORT", "STORE"), help=argparse.SUPPRESS)
    p.add_argument("--child-process", nargs=2, type=int, metavar=("PORT", "ID"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_store(url: str, rows: int, args) -> None:
    import numpy as np

    from crossjax.store import ActivationStore, StoreMeta

    meta = StoreMeta(snapshots=tuple(f"step{i}" for i in range(args.snapshots)), d_model=args.d_model,
                     num_rows=rows, block_rows=args.block_rows, dtype="float16", model="bench", hook="bench",
                     context_len=128)
    store = ActivationStore.create(url, meta)
    rng = np.random.default_rng(0)
    for b in range(meta.num_blocks):
        start, stop = store.block_range(b)
        for s in range(args.snapshots):
            store.write_block(b, s, rng.standard_normal((stop - start, args.d_model), np.float32))
        r = np.arange(start, stop)
        store.write_tokens(b, r % 50000, r // 127, r % 127 + 1)


def write_export(path: str, args) -> None:
    import numpy as np

    from crossjax import crosscoder, crosscoder_export

    cfg = crosscoder.CrosscoderConfig(num_snapshots=args.snapshots, d_model=args.d_model,
                                      num_features=args.features, activation=args.activation, k=16)
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=shape).astype(np.float32) / np.sqrt(args.d_model)
              for k, shape in crosscoder.param_shapes(cfg).items()}
    params["log_threshold"] = np.full(args.features, np.log(0.05), np.float32)
    crosscoder_export.export_params(params, np.ones(args.snapshots), cfg, path)


def measure(export: str, store_url: str, args) -> dict:
    """One fresh process (one of --processes when args.child_process is set): warm-up build, then the measured
    build."""
    if args.child_process:
        import jax
        port, process_id = args.child_process
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=args.processes,
                                   process_id=process_id)
    import psutil

    from crossjax.analysis import index_merge
    from crossjax.analysis.lookup import FeatureIndex

    build = dict(top_k=args.top_k, batch_rows=args.batch_rows, histogram_bins=args.histogram_bins, progress=False)
    FeatureIndex.build(export, store_url, max_rows=2 * args.batch_rows, **build)  # compiles the step
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with PeakRss() as rss:
        index = FeatureIndex.build(export, store_url, **build)
    seconds = time.perf_counter() - t0
    start, stop = index_merge.row_share(index.rows_scanned, args.batch_rows) if args.child_process else \
        (0, index.rows_scanned)
    return {"rows": index.rows_scanned, "rows_read": stop - start, "seconds": round(seconds, 2),
            "rows_per_s": round(index.rows_scanned / seconds), "rss_before_mib": round(before / 2 ** 20, 1),
            "peak_rss_growth_mib": round((rss.peak - before) / 2 ** 20, 1)}


def run_children(child: list[str], processes: int) -> dict:
    """The figures of one build: one child, or `processes` children joined on a free localhost port (then the
    largest growth and time of any of them, and each one's rows read and growth)."""
    if processes == 1:
        out = subprocess.run(child, check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([*child, "--child-process", str(port), str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(processes)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a benchmark process failed (exit codes {[p.returncode for p in procs]})")
    each = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return {"rows": each[0]["rows"], "seconds": max(r["seconds"] for r in each),
            "rows_per_s": round(each[0]["rows"] / max(r["seconds"] for r in each)),
            "rss_before_mib": max(r["rss_before_mib"] for r in each),
            "peak_rss_growth_mib": max(r["peak_rss_growth_mib"] for r in each),
            "per_process": [{k: r[k] for k in ("rows_read", "peak_rss_growth_mib")} for r in each]}


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args)))
        return
    for name in ("base_rows", "small", "large"):
        if getattr(args, name) < 1 or (args.base_rows * getattr(args, name)) % args.batch_rows:
            sys.exit(f"--{name.replace('_', '-')} must give a multiple of --batch-rows rows (one compiled shape)")
    tmp = tempfile.mkdtemp(prefix="crossjax-bench-index-")
    try:
        export = os.path.join(tmp, "export")
        write_export(export, args)
        results = []
        for times in (args.small, args.large):
            rows = args.base_rows * times
            url = os.path.join(tmp, f"store{times}")
            write_store(url, rows, args)
            child = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                     "--child", export, url]
            result = run_children(child, args.processes)
            result["store_mib"] = round(rows * (args.snapshots * args.d_model * 2 + 12) / 2 ** 20, 1)
            results.append(result)
            shutil.rmtree(url, ignore_errors=True)
        small, large = results
        f, s, k, b = args.features, args.snapshots, args.top_k, args.histogram_bins
        state = f * k * (4 * 5 + s) + s * f * b * 4 + f * 4  # top arrays, gates, histogram counts, exponents
        print(json.dumps({
            "bench": "index_memory", "snapshots": s, "d_model": args.d_model, "features": f,
            "activation": args.activation, "top_k": k, "batch_rows": args.batch_rows, "histogram_bins": b,
            "processes": args.processes,
            "index_state_mib": round(state / 2 ** 20, 1),
            "sizes": results,
            "rows_ratio": round(large["rows"] / small["rows"], 2),
            "growth_difference_mib": round(large["peak_rss_growth_mib"] - small["peak_rss_growth_mib"], 1),
        }))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
