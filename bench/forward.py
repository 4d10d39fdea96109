"""Forward throughput: crossjax's jitted Flax GPT-NeoX vs transformers' PyTorch model, same weights and tokens.

    python bench/forward.py [--d_model 512 --layers 6 --heads 8 --vocab 50304 --batch 8 --seq 512
                             --hook blocks.3.hook_resid_post --repeats 2 --store_batches 4]

Pythia-70m shape by default (random weights). Everything timed on the crossjax side is the code the activation
stage runs (crossjax.activations: its forward over models.Runner, its group buffers and its block writer).
Prints one JSON object:
- hook_tokens_per_s {flax, torch, ratio, cpu_ratio}: the stage's forward up to the hook layer, activations copied
  to the host (torch runs the same truncated stack); ratio = flax/torch throughput by wall time, cpu_ratio the same
  by this process's CPU seconds;
- full_tokens_per_s: the same for the whole model to logits (models.Runner.logits);
- bf16_hook_tokens_per_s: Flax with bfloat16 matmul inputs (float32 accumulation) against torch float32;
- store: the cost of writing the hook activations to an ActivationStore (float16), one group of rows per forward
  batch, as a fraction of computing the groups alone: written inline after each group, and written as the stage
  writes them (activations.write_groups: a background thread writes one group while the next is computed).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import activations
from crossjax.models import Runner, validate_hook
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


def store_overhead(model, a, hook, mesh, rounds=2):
    """Cost of writing the hook activations of `a.store_batches` forward batches to an ActivationStore, relative to
    computing them alone, through the stage's own functions. Each group holds the rows of one forward batch (all
    positions valid, rows shuffled within the group as the stage does).

    The machine may be shared, so the variants are interleaved and each is timed `rounds` times (best kept);
    CPU seconds of this process are reported beside wall seconds because they are less sensitive to other load.
    """
    from crossjax.row_layout import RowLayout
    from crossjax.store import DTYPES, ActivationStore, StoreMeta
    from crossjax.tokens import Contexts

    rows = a.batch * a.seq
    num_contexts = a.batch * a.store_batches
    rng = np.random.default_rng(1)
    ids = rng.integers(0, a.vocab, size=(num_contexts, a.seq)).astype(np.int32)
    contexts = Contexts(ids, np.ones(ids.shape, bool), np.arange(num_contexts))
    layout = RowLayout.build(contexts, block_rows=rows, group_rows=rows, shuffle=True, seed=0)
    groups = list(range(layout.num_groups))
    dtype = DTYPES["float16"]
    forward = activations.hook_forward(model, hook, dtype, mesh)
    missing = {(b, 0) for b in range(layout.num_blocks)}
    activations.group_activations(layout, 0, forward, a.batch, a.d_model, dtype)  # compile

    def compute_only(store):
        for g in groups:
            activations.group_activations(layout, g, forward, a.batch, a.d_model, dtype)

    def inline(store):
        for g in groups:
            buf = activations.group_activations(layout, g, forward, a.batch, a.d_model, dtype)
            activations.write_group(store, layout, 0, g, buf, missing)

    def background(store):
        activations.write_groups(store, layout, 0, groups, forward, a.batch, missing=missing)

    variants = {"forward": compute_only, "inline": inline, "threaded": background}
    wall = {k: float("inf") for k in variants}
    cpu = {k: float("inf") for k in variants}
    meta = StoreMeta(snapshots=("s0",), d_model=a.d_model, num_rows=layout.num_rows, block_rows=rows,
                     dtype="float16", model="bench", hook=hook, context_len=a.seq)
    with tempfile.TemporaryDirectory() as d:
        for r in range(rounds):
            for name, run in variants.items():
                store = ActivationStore.create(os.path.join(d, f"{name}{r}"), meta)  # a fresh store per run
                w0, c0 = time.perf_counter(), time.process_time()
                run(store)
                wall[name] = min(wall[name], time.perf_counter() - w0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
                if name != "forward":  # only the token units are left unwritten
                    assert all(snap is None for _, snap in store.missing_units())
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
    mesh = activations.local_mesh()
    if mesh is not None and a.batch % mesh.size:
        p.error(f"--batch {a.batch} must be a multiple of the {mesh.size} local devices")
    # the activation stage's forward: hook activations on the host (float32 here: the comparison is exact work)
    hook_fn = activations.hook_forward(model, a.hook, jnp.float32, mesh)
    hook_bf16 = activations.hook_forward(bf16, a.hook, jnp.float32, mesh)
    full_fn = Runner(model).logits
    t_hook, t_full = torch_fns(tmodel, ids_np, stop)

    # Parity first: the figures compare equal work only if the outputs agree.
    ref = t_hook().numpy() if stop < a.layers else None
    got = hook_fn(ids_np)
    if ref is not None:
        ln = model.final_layer_norm(jnp.asarray(got))  # torch's last_hidden_state is after final_layer_norm
        assert np.allclose(np.asarray(ln), ref, atol=2e-3), "flax and torch hook activations disagree"

    out = {"shape": {"d_model": a.d_model, "layers": a.layers, "heads": a.heads, "vocab": a.vocab,
                     "batch": a.batch, "seq": a.seq, "hook": a.hook},
           "devices": str(jax.devices()[0].platform), "torch_threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count()}
    t = timed({"flax": lambda: hook_fn(ids_np), "torch": t_hook, "flax_bf16": lambda: hook_bf16(ids_np)}, a.repeats)
    out["hook_tokens_per_s"] = figures(tokens, t, "flax")
    out["bf16_hook_tokens_per_s"] = figures(tokens, t, "flax_bf16")
    if not a.skip_full:
        ids = jnp.asarray(ids_np)
        t = timed({"flax": lambda: full_fn(ids).block_until_ready(), "torch": t_full}, a.repeats)
        out["full_tokens_per_s"] = figures(tokens, t, "flax")
    wall, cpu = store_overhead(model, a, a.hook, mesh)
    out["store"] = {"batches": a.store_batches, "write_MB_per_batch": tokens * a.d_model * 2 / 1e6,
                    "wall_s": wall, "cpu_s": cpu,
                    "inline_overhead": wall["inline"] / wall["forward"] - 1,
                    "threaded_overhead": wall["threaded"] / wall["forward"] - 1,
                    "inline_cpu_overhead": cpu["inline"] / cpu["forward"] - 1,
                    "threaded_cpu_overhead": cpu["threaded"] / cpu["forward"] - 1}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
