"""One snapshot's slice of a trained crosscoder as an SAE that SAELens loads from disk (`SAE.load_from_disk`).

    python -m crossjax.export_saelens --workdir=DIR --snapshot=step1000 --out=OUT [--refit_steps=N]

writes OUT/cfg.json and OUT/sae_weights.safetensors (SAELens' JumpReLU architecture: W_enc [D,F], b_enc [F],
W_dec [F,D], b_dec [D], threshold [F]) and OUT/crossjax_export.json (where it came from, and its EV).

The slice of snapshot s, with the store's normalisation scale c_s folded in (the crosscoder reads x * c_s):
    W_enc = c_s W_enc[s],  b_enc = b_enc,  W_dec = W_dec[s] / c_s,  b_dec = b_dec[s] / c_s,
    threshold_i = theta_i / n[s, i]      (the crosscoder's gate h_i n[s,i] > theta_i, as SAELens' h_i > threshold_i)
with n[s,i] the decoder row norm (floored at 1e-15 as in training). The decoder is the crosscoder's own; the
encoder is not quite: the crosscoder encodes a token from all S snapshots together, while a single SAE sees only
snapshot s, so the exported SAE's pre-activations lack the other snapshots' terms and its EV on its snapshot is
lower than the crosscoder's there. Both figures are written beside each other. `refit_steps` > 0 closes part of
that gap: it trains the encoder (W_enc, b_enc, threshold) on snapshot s's training rows with the decoder frozen,
using the crosscoder's own loss (its final sparsity coefficient), then exports the refit encoder.
The hook name is the store's (crossjax names hooks as TransformerLens does, e.g. blocks.3.hook_resid_post).
"""
from __future__ import annotations

import json

import numpy as np

from crossjax import console, crosscoder, crosscoder_export, files, paths, snapshot_names
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.errors import CrossjaxError

STAGE = "export_saelens"
WEIGHTS, CONFIG, PROVENANCE = "sae_weights.safetensors", "cfg.json", "crossjax_export.json"


def slice_params(params: dict, scales: np.ndarray, cfg: CrosscoderConfig, s: int) -> dict[str, np.ndarray]:
    """The SAELens JumpReLU tensors of snapshot s (module docstring), float32."""
    if cfg.activation != "jumprelu":
        raise CrossjaxError(f"SAELens export supports JumpReLU crosscoders; this one uses {cfg.activation!r}")
    c = float(scales[s])
    w_dec = np.asarray(params["W_dec"][s], np.float64)                              # [F, D]
    n = np.sqrt(np.maximum((w_dec ** 2).sum(-1), 1e-30))
    theta = np.exp(np.asarray(params["log_threshold"], np.float64))
    out = {"W_enc": c * np.asarray(params["W_enc"][s], np.float64), "b_enc": np.asarray(params["b_enc"], np.float64),
           "W_dec": w_dec / c, "b_dec": np.asarray(params["b_dec"][s], np.float64) / c, "threshold": theta / n}
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def saelens_config(d_model: int, num_features: int, hook: str, model: str, snapshot: str) -> dict:
    """cfg.json for SAELens 6 (JumpReLU, no input b_dec subtraction, no activation normalisation)."""
    return {
        "architecture": "jumprelu", "d_in": int(d_model), "d_sae": int(num_features), "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"model_name": model, "hook_name": hook, "sae_lens_version": "6.0.0",
                     "model_from_pretrained_kwargs": {"revision": snapshot} if snapshot.startswith("step") else {},
                     "prepend_bos": True, "exclude_special_tokens": False},
    }


def single_snapshot_ev(tensors: dict[str, np.ndarray], x: np.ndarray) -> float:
    """EV (PAPER.md) of the exported SAE on raw rows x [N, D] of its snapshot, computed as SAELens would."""
    from crossjax import metrics
    pre = x @ tensors["W_enc"] + tensors["b_enc"]
    acts = np.where(pre > tensors["threshold"], np.maximum(pre, 0.0), 0.0)
    xhat = acts @ tensors["W_dec"] + tensors["b_dec"]
    return float(metrics.explained_variance(x[:, None], xhat[:, None])[0])


def refit_encoder(params: dict, scales: np.ndarray, cfg: CrosscoderConfig, s: int, store, blocks, *, steps: int,
                  batch_size: int, lr: float, sparsity_coef: float, seed: int) -> dict:
    """params with W_enc[s], b_enc, log_threshold retrained on snapshot s alone (decoder frozen); S=1 slice."""
    import jax
    import jax.numpy as jnp
    import optax
    from crossjax import data
    one = CrosscoderConfig(**{**cfg.to_dict(), "num_snapshots": 1})
    p = {"W_enc": params["W_enc"][s:s + 1], "b_enc": params["b_enc"], "W_dec": params["W_dec"][s:s + 1],
         "b_dec": params["b_dec"][s:s + 1], "log_threshold": params["log_threshold"]}
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    trained = ("W_enc", "b_enc", "log_threshold")
    tx = optax.multi_transform({"train": optax.adam(lr), "frozen": optax.set_to_zero()},
                               {k: "train" if k in trained else "frozen" for k in p})
    scale = jnp.asarray([scales[s]], jnp.float32)

    @jax.jit
    def step(p, opt, acts):
        x = crosscoder.normalize(acts.astype(jnp.float32), scale)
        grads = jax.grad(lambda q: crosscoder.loss_fn(q, x, one, sparsity_coef=sparsity_coef)[0])(p)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(p)
    loader = data.make_loader(store, global_batch=batch_size, seed=seed, sharding=None, blocks=list(blocks),
                              snapshots=[s])
    bar = console.progress(STAGE, steps, unit="step")
    try:
        for _ in range(steps):
            p, opt = step(p, opt, jnp.asarray(next(loader)["acts"]))
            bar.update(1)
    finally:
        bar.close()
        loader.close()
    out = {k: np.array(v) for k, v in params.items()}
    out["W_enc"][s] = np.asarray(p["W_enc"][0])
    out["b_enc"], out["log_threshold"] = np.asarray(p["b_enc"]), np.asarray(p["log_threshold"])
    return out


def export(workdir: str, snapshot: str | int, out_dir: str, *, refit_steps: int = 0) -> dict:
    """Write the SAELens SAE of `snapshot` of the finished run in `workdir` to out_dir; return the provenance dict
    (also OUT/crossjax_export.json) with its EV on the run's held-out rows beside the crosscoder's there."""
    from crossjax import store as store_lib
    from crossjax.analysis.separability import read_rows
    from crossjax.summary import RunSummary
    summary = RunSummary.read(workdir)
    params, scales, cfg = crosscoder_export.load_exported(summary.export)
    s = snapshot_names.index_of(snapshot, summary.snapshots, where="the run")
    name = summary.snapshots[s]
    paths.check_supported(out_dir, "--out")
    if paths.isfile(out_dir):
        raise CrossjaxError(f"--out={out_dir} is a file; name a directory for the SAE")
    store = store_lib.ActivationStore.open(summary.store)
    from crossjax import workdir as workdir_lib
    recorded = workdir_lib.read_recorded(workdir)
    if recorded is None:
        raise CrossjaxError(f"{workdir} has no config.json: it is not the workdir of a crossjax run")
    train_cfg = recorded["train"]
    held = int(train_cfg["heldout_blocks"])
    blocks = range(store.meta.num_blocks)
    store_index = list(store.meta.snapshots).index(name)
    heldout_rows = np.concatenate([np.arange(*store.block_range(b)) for b in blocks[len(blocks) - held:]])
    x = read_rows(store, heldout_rows, [store_index])[:, 0].astype(np.float64)   # [N, D] raw
    figures = {"crosscoder_ev_on_snapshot": summary.heldout.get("ev", [None] * len(summary.snapshots))[s]}
    tensors = slice_params(params, scales, cfg, s)
    figures["exported_ev"] = single_snapshot_ev(tensors, x)
    if refit_steps > 0:
        refit = refit_encoder(params, scales, cfg, s, store, blocks[:len(blocks) - held], steps=int(refit_steps),
                              batch_size=min(int(train_cfg["batch_size"]), 4096), lr=float(train_cfg["lr"]),
                              sparsity_coef=float(train_cfg["sparsity_coef"]), seed=int(train_cfg["seed"]))
        tensors = slice_params(refit, scales, cfg, s)
        figures["refit_ev"], figures["refit_steps"] = single_snapshot_ev(tensors, x), int(refit_steps)
    paths.makedirs(out_dir)
    from safetensors.numpy import save_file
    files.atomic_write(paths.join(out_dir, WEIGHTS), lambda p: save_file(tensors, p))
    files.atomic_write_text(paths.join(out_dir, CONFIG), json.dumps(
        saelens_config(cfg.d_model, cfg.num_features, store.meta.hook, store.meta.model, name), indent=1) + "\n")
    provenance = {"workdir": paths.absolute(workdir), "snapshot": name, "snapshot_index": s,
                  "heldout_rows": int(len(x)), **figures}
    files.atomic_write_text(paths.join(out_dir, PROVENANCE), json.dumps(provenance, indent=1) + "\n")
    return provenance


def main(argv: list[str] | None = None) -> int:
    import argparse

    from crossjax import cli
    parser = argparse.ArgumentParser(prog="python -m crossjax.export_saelens", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished run's workdir")
    parser.add_argument("--snapshot", required=True, help="snapshot name (e.g. step1000) or 0-based index")
    parser.add_argument("--out", required=True, help="directory for cfg.json and sae_weights.safetensors")
    parser.add_argument("--refit_steps", type=int, default=0, help="> 0: refit the encoder on that snapshot alone")
    args = parser.parse_args(argv)
    snapshot = int(args.snapshot) if args.snapshot.lstrip("-").isdigit() else args.snapshot

    def body() -> None:
        out = export(args.workdir, snapshot, args.out, refit_steps=args.refit_steps)
        refit = f", after a {out['refit_steps']}-step encoder refit {out['refit_ev']:.4f}" if "refit_ev" in out else ""
        print(f"SAELens SAE of {out['snapshot']} in {args.out}: EV on its held-out rows {out['exported_ev']:.4f}"
              f"{refit} (the crosscoder, reading every snapshot: {out['crosscoder_ev_on_snapshot']:.4f})")

    cli.run(STAGE, body)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
