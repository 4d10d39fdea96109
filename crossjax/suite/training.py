"""The suite's pre-training loop: steps, snapshots in Hugging Face format, per-snapshot losses, resumable state.

At every snapshot step, in this order: the snapshot directory (renamed into place), losses.json (its record holds
the hash of the snapshot's weights as written), then the training state (params + optimizer state, an orbax
checkpoint under state/, the latest one kept). A build killed at any point resumes from the last checkpoint; the
batch of a step depends only on (seed, step) and the restored state holds the exact bits, so it ends with the
weights and losses of an uninterrupted build. (In a run of several JAX processes each one trains its own copy and
nothing is checkpointed: a killed build starts again at step 0.)
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import checkpoint as ckpt_lib
from crossjax import console
from crossjax.files import atomic_write_text
from crossjax.models import load as model_load
from crossjax.models import snapshot_files
from crossjax.suite import dirs, model, token_data

STATE_DIR = "state"  # only needed to resume; removed once the suite is complete
WEIGHTS_KEY = "weights_sha256"  # a snapshot's content hash (models.snapshot_files.weights_hash) in its records


def train(root: Path, s: dict, fp: str, snapshot_steps: list[int], show: bool) -> None:
    """Trains the model of settings `s` under `root` up to its last snapshot step, resuming from root/state."""
    tok_dir, train_stream, heldout_stream = token_data.prepare_data(root, s, show)
    sampler = token_data.ChunkSampler(train_stream, s["context_len"], s["batch"], s["seed"])
    eval_train = token_data.eval_sample(train_stream, s["context_len"], s["eval_contexts"])
    eval_heldout = token_data.eval_sample(heldout_stream, s["context_len"], s["eval_contexts"])
    cfg = model.neox_config(s)
    trainer = model.get_trainer(s)
    params, opt_state = trainer.fresh_state()
    losses_path = root / "losses.json"
    checkpoints = _checkpoints(root, show)
    try:
        restored, records = None if checkpoints is None else _restore(checkpoints, params, opt_state), []
        if restored is None:
            step = 0
        else:
            step, params, opt_state = restored.step, restored.state["params"], restored.state["opt_state"]
            prev = dirs.read_json(losses_path) or {}
            records = [r for r in prev.get("snapshots", []) if r["step"] <= step]
            console.say("suite", f"resuming at step {step} of {s['steps']}", enabled=show)

        baselines = {"uniform": math.log(s["vocab_size"]),
                     "unigram_heldout": token_data.unigram_cross_entropy(train_stream, heldout_stream,
                                                                         s["vocab_size"])}
        n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
        console.say("suite", f"model: d_model {s['d_model']}, {s['layers']} layers, {n_params:,} parameters; "
                    f"{len(train_stream):,} training tokens; {s['steps']} steps of {s['batch']}x{s['context_len']} "
                    f"tokens; {len(snapshot_steps)} snapshots", enabled=show)

        def write_snapshot(at_step: int, running: list[float]):
            name = f"step{at_step}"
            tmp = dirs.fresh_partial_dir(root / name)
            model_load.save_hf_snapshot(trainer.model(params), cfg, tmp, tokenizer_dir=tok_dir)
            weights = snapshot_files.weights_hash(tmp)  # recorded, so that a later reuse can verify the file
            dirs.replace_dir(tmp, root / name)
            rec = {"name": name, "step": at_step, "tokens_seen": at_step * s["batch"] * s["context_len"],
                   "train_loss": trainer.evaluate(params, eval_train, s["eval_contexts"]),
                   "heldout_loss": trainer.evaluate(params, eval_heldout, s["eval_contexts"]),
                   "train_loss_running": float(np.mean(running)) if running else None,
                   WEIGHTS_KEY: weights}
            records[:] = [r for r in records if r["step"] < at_step] + [rec]
            atomic_write_text(losses_path, json.dumps(
                {"snapshots": records, "baselines": baselines, "eval_tokens_per_split": int(eval_heldout.size),
                 "fingerprint": fp}, indent=2))
            if checkpoints is not None:
                checkpoints.save(at_step, {"params": params, "opt_state": opt_state})
            console.say("suite", f"snapshot {name}: train {rec['train_loss']:.3f}  held-out "
                        f"{rec['heldout_loss']:.3f}", enabled=show)

        if step == 0 and not any(r["step"] == 0 for r in records):
            write_snapshot(0, [])
        pending = [n for n in snapshot_steps if n > step]
        bar = console.progress("suite", s["steps"], unit="step", initial=step, enabled=show)
        running: list[float] = []
        tokens_per_step = s["batch"] * s["context_len"]
        t0, steps_this_run = time.time(), 0
        while pending:
            batch = jnp.asarray(sampler.batch(step))
            params, opt_state, loss = trainer.step(params, opt_state, batch)
            step += 1
            steps_this_run += 1
            running.append(float(loss))
            bar.update(1)
            tok_s = tokens_per_step * steps_this_run / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{running[-1]:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if step == pending[0]:
                pending.pop(0)
                write_snapshot(step, running)
                running = []
        bar.close()
    finally:
        if checkpoints is not None:
            checkpoints.close()


def _checkpoints(root: Path, show: bool) -> ckpt_lib.Checkpoints | None:
    """The training state's checkpoints (saved synchronously: the next step donates the buffers); None when several
    JAX processes run, as orbax saves only arrays that span the processes and here each process trains alone."""
    if jax.process_count() > 1:
        console.say("suite", f"{jax.process_count()} JAX processes: the training state is not checkpointed, so a "
                    "killed build starts again at step 0 (and ends with the same weights)", enabled=show)
        return None
    return ckpt_lib.Checkpoints(root / STATE_DIR, keep=1, async_save=False)


def _restore(checkpoints: ckpt_lib.Checkpoints, params, opt_state) -> ckpt_lib.Restored | None:
    """The newest suite checkpoint that restores with finite numbers, onto the shardings of the fresh state given
    (a damaged one is skipped and set aside; none at all: None)."""
    target = {"params": params, "opt_state": opt_state}
    abstract = ckpt_lib.abstract_like(target, jax.tree.map(lambda x: x.sharding, target))
    return checkpoints.restore_latest(abstract, stage="suite")


def remove_state(root: Path) -> None:
    """Drops the training state of a complete suite (it is only needed to resume)."""
    shutil.rmtree(root / STATE_DIR, ignore_errors=True)
