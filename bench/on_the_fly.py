"""Cost per token of training from the written store against training on activations computed on the fly.

Both paths run the code users run, on the same config (by default experiments/tiny.py:micro, its suite built or
reused under $CROSSJAX_CACHE): the stored path writes the activation store (crossjax.activations, timed), then
crossjax.trainer.train reads it; the on-the-fly path (data.on_the_fly, crossjax/live_store.py) writes only the
tokens and the held-out blocks, loads the snapshots (timed), then crossjax.trainer.train computes the training
rows as it reads them. Both train the same steps on the same batches; only the source of the rows differs.

    python bench/on_the_fly.py                                   # micro suite, 4096 tokens, 60 steps of 128
    python bench/on_the_fly.py --num_tokens=32768 --steps=200 --cpu_devices=1

Per path: seconds of each stage; train_s (trainer.train's wall time: memory plan, compilation, steps, the final
checkpoint); steady_tokens_per_s (the steps after --warmup, timed from step --warmup to the last, both waited
for); per_token_us (train_s / trained tokens) and, for the stored path, write_per_token_us (the activation
stage's seconds per stored row, all snapshots: the cost the on-the-fly path pays inside training instead);
peak_rss_mb of the process during the path; disk_mb of the store. The paths run --repeats times, interleaved,
each in new directories; the last run of each is reported (train_s_each_run lists all). A final block gives the
ratios. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

from _rss import PeakRss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("write_store_s", "write_heldout_s", "load_snapshots_s", "scales_s", "train_s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "tiny.py:micro"))
    p.add_argument("--num_tokens", type=int, default=0, help="tokens.num_tokens (0: the config's)")
    p.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
    p.add_argument("--batch", type=int, default=0, help="train.batch_size (0: the config's)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of steady_tokens_per_s")
    p.add_argument("--repeats", type=int, default=2, help="runs of each path, interleaved; the last is reported "
                   "(the first pays the compilations both paths share)")
    p.add_argument("--cpu_devices", type=int, default=0, help="if >0, simulate this many CPU devices")
    p.add_argument("--dir", default="", help="where the two stores and workdirs go (kept); default: a temporary dir")
    return p.parse_args()


def bench_config(args, on_the_fly: bool, store: str):
    from crossjax import config_checks, configs, pipeline
    c = configs.load_experiment(args.config)
    c.data.on_the_fly = on_the_fly
    c.store.path = store
    if args.num_tokens:
        c.tokens.num_tokens = args.num_tokens
    if args.steps:
        c.train.steps = args.steps
    if args.batch:
        c.train.batch_size = args.batch
    c.activations.shuffle_group_rows = int(c.store.block_rows)  # one block per group: the on-the-fly setting
    c.train.checkpoint_every, c.train.eval_every, c.train.progress = 0, 0, False
    c.train.log_every = int(c.train.steps)
    c.suite.progress = False
    c.eval.report = False      # the bench times the data and training stages, not the analyses
    c = pipeline.bind_suite(c)
    config_checks.validate(c)
    return c


def _disk_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20


def run_path(args, on_the_fly: bool, root: str, rep: int) -> dict:
    import jax
    from crossjax import activations, live_store, pipeline, trainer
    from crossjax import store as store_lib

    name = ("on_the_fly" if on_the_fly else "stored") + str(rep)
    store_dir, workdir = os.path.join(root, name, "store"), os.path.join(root, name, "run")
    os.makedirs(workdir, exist_ok=True)
    config = bench_config(args, on_the_fly, store_dir)
    heldout = int(config.train.heldout_blocks)
    out: dict = {}
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if on_the_fly:
            prepared = live_store.write_stored_part(config, None, stored_tail_blocks=heldout, progress=False)
            out["write_heldout_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            store = live_store.open_live(prepared, config, stored_tail_blocks=heldout)
            out["load_snapshots_s"] = time.perf_counter() - t1
        else:
            store = store_lib.ActivationStore.open(activations.ensure_activations(config, None, progress=False))
            out["write_store_s"] = time.perf_counter() - t0
            out["write_per_token_us"] = 1e6 * out["write_store_s"] / store.meta.num_rows
        t1 = time.perf_counter()
        scales = pipeline.ensure_scales(config, store)
        out["scales_s"] = time.perf_counter() - t1
        train_blocks, _ = pipeline.split_blocks(config, store)
        source = trainer.TrainData(store=store, blocks=train_blocks, scales=scales,
                                   device_bytes=getattr(store, "device_bytes", 0))
        stamps: dict[int, float] = {}

        def stamp(event):  # steps `warmup` and the last, each waited for: the steps between them are timed
            if event.step in (args.warmup, event.total_steps):
                jax.block_until_ready(event.metrics["loss"])
                stamps[event.step] = time.perf_counter()

        t1 = time.perf_counter()
        result = trainer.train(config, workdir, source, callbacks=[stamp])
        out["train_s"] = time.perf_counter() - t1
    tokens = result.end_step * result.batch_size
    steady = stamps[result.end_step] - stamps[args.warmup]
    out.update(tokens=tokens, steps=result.end_step, batch=result.batch_size,
               per_token_us=1e6 * out["train_s"] / tokens,
               steady_tokens_per_s=(result.end_step - args.warmup) * result.batch_size / steady,
               peak_rss_mb=rss.peak / 2 ** 20, disk_mb=_disk_mb(store_dir),
               store_rows=store.meta.num_rows, train_rows=source.num_rows,
               device_bytes=int(source.device_bytes))
    out["stage_total_s"] = sum(out.get(k, 0.0) for k in STAGES)
    return out


def main() -> None:
    args = parse_args()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    import jax
    from crossjax import pipeline
    from crossjax.suite import pretrain

    root = args.dir or tempfile.mkdtemp(prefix="crossjax-bench-otf-")
    try:
        base = bench_config(args, False, os.path.join(root, "unused"))
        if base.suite.enabled:
            with contextlib.redirect_stdout(sys.stderr):
                pretrain.ensure_suite(base)                      # built once (cached), not timed
        runs: dict = {"stored": [], "on_the_fly": []}
        with contextlib.redirect_stdout(sys.stderr):            # the stages' plans: stdout holds the JSON alone
            for rep in range(args.repeats):
                runs["stored"].append(run_path(args, False, root, rep))
                runs["on_the_fly"].append(run_path(args, True, root, rep))
        paths = {k: {**v[-1], "train_s_each_run": [r["train_s"] for r in v]} for k, v in runs.items()}
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    s, f = paths["stored"], paths["on_the_fly"]
    out = {
        "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
        "num_devices": jax.device_count(), "machine": platform.processor() or platform.machine(),
        "python": sys.version.split()[0], "config": args.config,
        "model": {"snapshots": len(base.model.snapshots), "hook": base.model.hook, "d_model": base.data.d_model,
                  "context_len": int(base.tokens.context_len),
                  "contexts_per_batch": int(base.activations.contexts_per_batch)},
        "crosscoder": {"features": int(base.crosscoder.num_features), "activation": base.crosscoder.activation},
        **paths,
        "ratios": {
            "train_per_token_on_the_fly_over_stored": f["per_token_us"] / s["per_token_us"],
            "steady_throughput_stored_over_on_the_fly": s["steady_tokens_per_s"] / f["steady_tokens_per_s"],
            # the whole bill per trained token: stored = write the store + train; on the fly = everything
            "all_stages_on_the_fly_over_stored": f["stage_total_s"] / s["stage_total_s"],
            "disk_on_the_fly_over_stored": f["disk_mb"] / s["disk_mb"],
        },
        "dir": root if args.dir else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
