"""Forward throughput: crossjax's jitted Flax GPT-NeoX vs transformers' PyTorch model, same weights and tokens.

    python bench/forward.py [--d_model 512 --layers 6 --heads 8 --vocab 50304 --batch 8 --seq 512
                             --hook blocks.3.hook_resid_post --repeats 2 --store_batches 4]

Pythia-70m shape by default (random weights). Prints one JSON object:
- hook_tokens_per_s {flax, torch, ratio, cpu_ratio}: forward up to the hook layer (torch runs the same truncated
  stack); ratio = flax/torch throughput by wall time, cpu_ratio the same by this process's CPU seconds;
- full_tokens_per_s: the same for the whole model to logits;
- bf16_hook_tokens_per_s: Flax with bfloat16 matmul inputs (float32 accumulation) against torch float32;
- store: the cost of writing the hook activations to an ActivationStore (float16) after each forward, as a
  fraction of the forward alone, written inline and written by a background thread while the next forward runs.
"""
import argparse
import importlib.util
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from crossjax.models import jit_forward, jit_run_hooks, validate_hook
from crossjax.models.load import load_snapshot


def timed(fns, repeats):
    """{name: (median wall s, median CPU s of this process)} for each fn, after one warm-up (compilation) run.

    The functions are run in alternation so that load from other processes on a shared machine falls on all
    of them alike; CPU seconds are less sensitive to such load than wall seconds."""
    for fn in fns.values():
        fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def figures(tokens, t, flax, torch_name="torch"):
    (fw, fc), (tw, tc) = t[flax], t[torch_name]
    return {"flax": tokens / fw, "torch": tokens / tw, "ratio": tw / fw, "cpu_ratio": tc / fc}


def build_torch_model(a, path):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=a.vocab, hidden_size=a.d_model, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        intermediate_size=4 * a.d_model, rotary_pct=0.25, max_position_embeddings=max(2048, a.seq),
        use_parallel_residual=True)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def torch_fns(model, ids_np, stop):
    import torch

    ids = torch.as_tensor(ids_np, dtype=torch.long)
    all_layers = model.gpt_neox.layers

    def to_hook():
        # The same work as the Flax hook forward: blocks 0..stop-1 only (final_layer_norm is negligible).
        model.gpt_neox.layers = all_layers[:stop]
        try:
            with torch.inference_mode():
                return model.gpt_neox(ids).last_hidden_state
        finally:
            model.gpt_neox.layers = all_layers

    def full():
        with torch.inference_mode():
            return model(ids).logits

    return to_hook, full


def store_overhead(model, a, hook, batches, rounds=2):
    """Cost of writing each batch's hook activations to an ActivationStore, relative to the forward alone.

    The machine may be shared, so the variants are interleaved and each is timed `rounds` times (best kept);
    CPU seconds of this process are reported beside wall seconds because they are less sensitive to other load.
    """
    from crossjax.store import ActivationStore, StoreMeta

    fn = jit_run_hooks(model, [hook])
    rows = a.batch * a.seq
    fn(batches[0])[hook].block_until_ready()

    def forward_only(store):
        for ids in batches:
            np.asarray(fn(ids)[hook])  # the device->host copy is part of any real use

    def inline(store):
        for b, ids in enumerate(batches):
            store.write_block(b, 0, np.asarray(fn(ids)[hook]).reshape(rows, a.d_model), overwrite=True)

    def threaded(store):
        q: queue.Queue = queue.Queue(maxsize=2)
        errors = []

        def writer():
            while (item := q.get()) is not None:
                try:
                    store.write_block(item[0], 0, item[1], overwrite=True)
                except Exception as e:  # surfaced after the loop
                    errors.append(e)

        t = threading.Thread(target=writer)
        t.start()
        out = fn(batches[0])[hook]
        for b in range(len(batches)):
            nxt = fn(batches[b + 1])[hook] if b + 1 < len(batches) else None  # dispatched before the write
            q.put((b, np.asarray(out).reshape(rows, a.d_model)))
            out = nxt
        q.put(None)
        t.join()
        if errors:
            raise errors[0]

    variants = {"forward": forward_only, "inline": inline, "threaded": threaded}
    wall = {k: float("inf") for k in variants}
    cpu = {k: float("inf") for k in variants}
    with tempfile.TemporaryDirectory() as d:
        meta = StoreMeta(snapshots=("s0",), d_model=a.d_model, num_rows=rows * len(batches), block_rows=rows,
                         dtype="float16", model="bench", hook=hook, context_len=a.seq)
        store = ActivationStore.create(os.path.join(d, "store"), meta)
        for _ in range(rounds):
            for name, run in variants.items():
                w0, c0 = time.perf_counter(), time.process_time()
                run(store)
                wall[name] = min(wall[name], time.perf_counter() - w0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        assert all(snap is None for _, snap in store.missing_units())  # only token units are not written
    return wall, cpu


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hook", default="blocks.3.hook_resid_post")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--store_batches", type=int, default=4)
    p.add_argument("--skip_full", action="store_true", help="skip the full-model (logits) figures")
    a = p.parse_args(argv)
    import torch

    tokens = a.batch * a.seq
    rng = np.random.default_rng(0)
    ids_np = rng.integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32)
    with tempfile.TemporaryDirectory() as d:
        tmodel = build_torch_model(a, d)
        model = load_snapshot(d).model
        bf16 = load_snapshot(d, dtype=jnp.bfloat16).model
    stop = validate_hook(model.cfg, a.hook)
    ids = jnp.asarray(ids_np)
    hook_fn = jit_run_hooks(model, [a.hook])
    hook_bf16 = jit_run_hooks(bf16, [a.hook])
    t_hook, t_full = torch_fns(tmodel, ids_np, stop)

    # Parity first: the figures compare equal work only if the outputs agree.
    ref = t_hook().numpy() if stop < a.layers else None
    got = np.asarray(hook_fn(ids)[a.hook])
    if ref is not None:
        ln = model.final_layer_norm(jnp.asarray(got))  # torch's last_hidden_state is after final_layer_norm
        assert np.allclose(np.asarray(ln), ref, atol=2e-3), "flax and torch hook activations disagree"

    out = {"shape": {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "vocab": a.vocab,
                     "batch": a.batch, "seq": a.seq, "hook": a.hook},
           "devices": str(jax.devices()[0].platform), "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count()}
    t = timed({"flax": lambda: hook_fn(ids)[a.hook].block_until_ready(), "torch": t_hook,
               "flax_bf16": lambda: hook_bf16(ids)[a.hook].block_until_ready()}, a.repeats)
    out["hook_tokens_per_s"] = figures(tokens, t, "flax")
    out["bf16_hook_tokens_per_s"] = figures(tokens, t, "flax_bf16")
    if not a.skip_full:
        full_fn = jit_forward(model)
        t = timed({"flax": lambda: full_fn(ids).block_until_ready(), "torch": t_full}, a.repeats)
        out["full_tokens_per_s"] = figures(tokens, t, "flax")
    if importlib.util.find_spec("crossjax.store") is None:
        out["store"] = "crossjax.store is not available"
    else:
        batches = [jnp.asarray(rng.integers(0, a.vocab, size=(a.batch, a.seq)).astype(np.int32))
                   for _ in range(a.store_batches)]
        wall, cpu = store_overhead(model, a, a.hook, batches)
        out["store"] = {"batches": a.store_batches, "write_MB_per_batch": tokens * a.d_model * 2 / 1e6,
                        "wall_s": wall, "cpu_s": cpu,
                        "inline_overhead": wall["inline"] / wall["forward"] - 1,
                        "threaded_overhead": wall["threaded"] / wall["forward"] - 1,
                        "inline_cpu_overhead": cpu["inline"] / cpu["forward"] - 1}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
