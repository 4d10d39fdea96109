"""Throughput of the trainer's own jitted training step (crossjax.trainer.make_train_step, with its shardings and
donation: normalise, loss + grad, Adam, NaN flag, dead counters), against this machine's matmul peak.

    python bench/train_step.py                      # S=8, D=512, F=4096, B=4096, JumpReLU, bf16 and f32
    python bench/train_step.py --batch=1024 --dtypes=bfloat16 --activation=topk

Prints one JSON object with, per compute dtype:
  step_s (fastest of --steps), tokens_per_s, flops_per_step = 3 x 2*B*S*D*F for each of encoder and decoder
  (forward and backward; the step really executes 5 of those 6 matmuls, since x needs no gradient:
  flops_executed_per_step), flops_per_s, and fraction_of_peak against matmul_peak_flops_per_s, the fastest
  jitted [B, S*D] @ [S*D, F] matmul (the encoder's shape; operands in that dtype, float32 accumulation) timed
  in the same run. The *_cpu_s / *_cpu_time figures divide by process CPU seconds instead of wall seconds:
  on a machine shared with other work they stay comparable between the step and the peak.
The step normalises a float16 batch (as the store serves it) inside the jit, as training does.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import crosscoder as cc


def _timed(fn, reps: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of `reps` calls of fn (blocking on its result)."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def matmul_peak(m: int, k: int, n: int, dtype, reps: int) -> tuple[float, float]:
    """(FLOP/s, FLOP per CPU-second) of a jitted [m,k] @ [k,n] matmul, `dtype` operands, float32 accumulation."""
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(mm(a, b))
    wall, cpu = _timed(lambda: mm(a, b), reps)
    return 2.0 * m * k * n / min(wall), 2.0 * m * k * n / min(cpu)


def production_step(shape: dict, activation: str, batch: int, compute_dtype: str, total_steps: int):
    """The trainer's own jitted step (crossjax.trainer.make_train_step: normalisation, loss, grads, Adam with the
    threshold's rate, NaN flag, dead-feature counters) with its shardings and donation, on a one-device mesh, and
    a fresh state born sharded as training makes it. Returns (step, state, shardings)."""
    from crossjax import configs, sharding, trainer

    config = configs.base_config()
    config.crosscoder.num_features = shape["F"]
    config.crosscoder.activation = activation
    config.train.batch_size = batch
    config.train.compute_dtype = compute_dtype
    config.train.warmup_steps = 0
    config.mesh.data, config.mesh.snapshot, config.mesh.feature = 1, 1, 1
    cc_cfg, tx, abstract = trainer.abstract_train_state(config, num_snapshots=shape["S"], d_model=shape["D"],
                                                        total_steps=total_steps)
    shard = trainer.make_shardings(sharding.make_mesh(config.mesh), abstract)
    state = jax.jit(trainer.init_state_fn(cc_cfg, tx, 0.2), out_shardings=shard["state"])(jax.random.key(0))
    return trainer.make_train_step(cc_cfg, tx, config, total_steps, shard), state, shard


def bench_step(shape: dict, activation: str, batch: int, compute_dtype, steps: int, warmup: int) -> dict:
    from crossjax import sharding
    s, d, f = shape["S"], shape["D"], shape["F"]
    step, state, shard = production_step(shape, activation, batch, jnp.dtype(compute_dtype).name,
                                         steps + warmup + 1)
    x16 = jax.device_put(jax.random.normal(jax.random.key(2), (batch, s, d), jnp.float16), shard["batch"])
    scales = jax.device_put(jnp.ones((s,), jnp.float32), sharding.replicated(shard["mesh"]))
    t0 = time.perf_counter()
    state, out = step(state, x16, scales)
    jax.block_until_ready(out["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, out = step(state, x16, scales)
    jax.block_until_ready(out["loss"])
    holder = [state, out]

    def one():
        holder[:] = step(holder[0], x16, scales)
        return holder[1]["loss"]
    wall, cpu = _timed(one, steps)
    loss, l0 = holder[1]["loss"], holder[1]["l0"]
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)} in the benchmark step")
    t, c = min(wall), min(cpu)
    flops = 2 * 3 * 2.0 * batch * s * d * f
    return {"step_s": t, "step_s_median": float(np.median(wall)), "step_cpu_s": c, "compile_s": compile_s,
            "tokens_per_s": batch / t, "flops_per_step": flops, "flops_executed_per_step": flops * 5 / 6,
            "flops_per_s": flops / t, "flops_per_cpu_s": flops / c,
            "loss": float(loss), "mean_l0": float(jnp.mean(l0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", type=int, default=8)
    ap.add_argument("--d_model", type=int, default=512)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--activation", default="jumprelu", choices=cc.ACTIVATIONS)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated compute dtypes")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak_reps", type=int, default=5)
    args = ap.parse_args()

    shape = {"S": args.snapshots, "D": args.d_model, "F": args.features}
    out = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
           "num_devices": jax.device_count(), "machine": platform.processor() or platform.machine(),
           "jax": jax.__version__, "S": args.snapshots, "D": args.d_model, "F": args.features, "B": args.batch,
           "activation": args.activation, "results": {}}
    for name in args.dtypes.split(","):
        dtype = jnp.dtype(name)
        res = bench_step(shape, args.activation, args.batch, dtype, args.steps, args.warmup)
        peak, peak_cpu = matmul_peak(args.batch, args.snapshots * args.d_model, args.features, dtype,
                                     args.peak_reps)
        res["matmul_peak_flops_per_s"] = peak
        res["matmul_peak_flops_per_cpu_s"] = peak_cpu
        res["fraction_of_peak"] = res["flops_per_s"] / peak
        res["fraction_of_peak_cpu_time"] = res["flops_per_cpu_s"] / peak_cpu
        res["fraction_of_peak_executed"] = res["fraction_of_peak"] * 5 / 6
        res["fraction_of_peak_executed_cpu_time"] = res["fraction_of_peak_cpu_time"] * 5 / 6
        out["results"][name] = res
    if "bfloat16" in out["results"] and "float32" in out["results"]:
        bf = out["results"]["bfloat16"]
        f32 = out["results"]["float32"]
        f32["fraction_of_bf16_peak"] = f32["flops_per_s"] / bf["matmul_peak_flops_per_s"]
        f32["fraction_of_bf16_peak_cpu_time"] = f32["flops_per_cpu_s"] / bf["matmul_peak_flops_per_cpu_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
