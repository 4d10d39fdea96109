"""Run one experiment at several hook layers and compare what the crosscoder finds at each.

    python -m crossjax.layer_sweep --config=experiments/tiny.py --layers=0,1,2,3 --workdir=DIR [--config.a.b=v ...]

Each layer is the normal pipeline (crossjax.pipeline.run) with model.hook replaced by --hook (default
blocks.{layer}.hook_resid_post; e.g. --hook=blocks.{layer}.hook_attn_out), in DIR/layer<N> with its own store. The
same command again reuses finished layers (a layer whose workdir holds another config is refused, as for train)
and resumes an interrupted one. Every layer is trained before any is analysed, so an analysis never costs a
training run.

Per layer, printed and written to DIR/layer_sweep.json: the feature kinds and the emergent features by training
step (crossjax/analysis/evolution.py), the same on decoder norms in raw activation units (per-snapshot
normalisation undone), the share of each feature's activation variance the current token explains
(crossjax/analysis/token_dependence.py, on the held-out blocks, at each feature's peak snapshot: median per kind),
and the held-out EV and L0.
"""
from __future__ import annotations

import copy
import json
import os

from absl import flags

from crossjax import cli

LAYERS = flags.DEFINE_list("layers", None, "hook layers to sweep, e.g. 0,1,2,3")
HOOK = flags.DEFINE_string("hook", "blocks.{layer}.hook_resid_post", "the hook name of each layer ({layer} is "
                           "replaced by the layer number)")
SWEEP_FILE = "layer_sweep.json"


def layer_config(config, layer: int, hook: str):
    """A copy of the config hooked at `layer`."""
    out = copy.deepcopy(config)
    out.model.hook = hook.format(layer=layer)
    return out


def run_layer(config, workdir: str):
    """The finished RunSummary of this config in workdir: read when the run is already finished (after checking the
    workdir holds this same config), else made by pipeline.run (which resumes an interrupted run)."""
    from crossjax import configs, pipeline
    from crossjax import workdir as workdir_lib
    from crossjax.summary import SUMMARY_FILE, RunSummary
    bound = pipeline.bind_suite(config)
    if os.path.exists(os.path.join(workdir, SUMMARY_FILE)) and workdir_lib.check(bound, workdir, configs.base_config()):
        return RunSummary.read(workdir)
    summary = pipeline.run(config, workdir)
    if not isinstance(summary, RunSummary):   # a callback or stop_after ended it early: not a finished layer
        from crossjax.errors import CrossjaxError
        raise CrossjaxError(f"the run in {workdir} stopped at step {summary.step} of {summary.total_steps}; run the "
                            "same layer_sweep command again to finish it")
    return summary


def analyse_layer(config, summary, layer: int) -> dict:
    """One row of the sweep's table (JSON-ready) from a finished layer's summary, export and store."""
    import numpy as np

    from crossjax import crosscoder_export, pipeline, snapshot_names
    from crossjax import store as store_lib
    from crossjax.analysis import evolution, token_dependence
    params, scales, cc_cfg = crosscoder_export.load_exported(summary.export)
    store = store_lib.ActivationStore.open(summary.store)
    _, subset = snapshot_names.select(config.data.snapshots, store.meta.snapshots)
    _, heldout_blocks = pipeline.split_blocks(config, store)
    threshold = float(config.eval.emergence_threshold)
    tokens = token_dependence.from_store(store, heldout_blocks, params, scales, cc_cfg, subset, threshold=threshold)
    raw = evolution.compare_raw_units(params["W_dec"], scales, summary.snapshots, threshold)
    heldout = summary.heldout
    return {
        "layer": layer, "hook": config.model.hook, "workdir": summary.workdir,
        "kinds": summary.evolution["kinds"],
        "kinds_firing_heldout": tokens["kinds_firing"],
        "emergent_features_by_step": summary.evolution["emergent_features_by_step"]
        or summary.evolution["emergent_features_by_snapshot"],
        "token_share_at_peak_median": {k: v["median"] for k, v in tokens["at_peak_by_kind"].items()},
        "token_share_at_peak_measured": {k: v["measured"] for k, v in tokens["at_peak_by_kind"].items()},
        "token_share_at_peak_frac_above_0.5": tokens["at_peak_by_kind"]["all"]["frac_above_0.5"],
        "token_share_median_by_snapshot": dict(zip(summary.snapshots, tokens["median_by_snapshot"])),
        "token_share_rows": {k: tokens[k] for k in ("rows", "rows_kept", "tokens_kept", "min_count", "min_active")},
        "raw_units": raw,
        "heldout_ev": heldout.get("ev_mean"), "heldout_l0": heldout.get("l0_mean"),
        "dead_frac": heldout.get("dead_frac"),
        "scales": [float(v) for v in np.asarray(scales)],
    }


def table(rows: list[dict]) -> str:
    """The sweep as a text table: one line per layer."""
    kinds = ("initialisation", "emergent", "transient", "persistent", "dead")
    head = (f"{'layer':>5}  " + "  ".join(f"{k[:7]:>7}" for k in kinds)
            + "  tok-share(all/init/emerg/pers)  raw-unit emergent  kind changed  EV      L0")
    lines = [head]
    for r in rows:
        share = r["token_share_at_peak_median"]

        def f(v):
            return "  -  " if v is None else f"{v:.2f}"
        raw = r["raw_units"]
        lines.append(f"{r['layer']:>5}  " + "  ".join(f"{r['kinds'][k]:>7}" for k in kinds)
                     + f"  {f(share['all'])}/{f(share['initialisation'])}/{f(share['emergent'])}/"
                       f"{f(share['persistent'])}          "
                     + f"{raw['kinds_raw']['emergent']:>17}  {raw['changed']:>12}  "
                     + f"{r['heldout_ev'] if r['heldout_ev'] is None else round(r['heldout_ev'], 4):<6}  "
                     + f"{r['heldout_l0'] if r['heldout_l0'] is None else round(r['heldout_l0'], 1)}")
    lines.append("emergent features by training step (normalised units | raw units):")
    for r in rows:
        norm = ", ".join(f"{k}:{v}" for k, v in r["emergent_features_by_step"].items() if v) or "none"
        raw = ", ".join(f"{k}:{v}" for k, v in r["raw_units"]["emergent_features_by_step"].items() if v) or "none"
        lines.append(f"  layer {r['layer']}: {norm}  |  {raw}")
    return "\n".join(lines)


def sweep(config, workdir: str, layers: list[int], hook: str = HOOK.default) -> list[dict]:
    """Train every layer (reusing finished ones), then analyse each; write workdir/layer_sweep.json."""
    from crossjax import config_checks, console, pipeline
    from crossjax.errors import CrossjaxError
    from crossjax.files import atomic_write_text
    if "{layer}" not in hook or hook.replace("{layer}", "").count("{") or hook.replace("{layer}", "").count("}"):
        raise CrossjaxError(f"--hook={hook} must name each layer's hook with {{layer}} once in it, e.g. "
                            "--hook=blocks.{layer}.hook_resid_post")
    per_layer = [layer_config(config, layer, hook) for layer in layers]
    for cfg in per_layer:                  # a layer past the model's depth fails before any layer is trained
        config_checks.validate(pipeline.bind_suite(cfg))
    os.makedirs(workdir, exist_ok=True)
    summaries = []
    for layer, cfg in zip(layers, per_layer):
        console.say("layer_sweep", f"layer {layer}: {cfg.model.hook} in {workdir}/layer{layer}")
        summaries.append((cfg, run_layer(cfg, os.path.join(workdir, f"layer{layer}"))))
    rows = [analyse_layer(cfg, summary, layer) for layer, (cfg, summary) in zip(layers, summaries)]
    atomic_write_text(os.path.join(workdir, SWEEP_FILE), json.dumps({"layers": rows}, indent=1) + "\n")
    return rows


def parse_layers(values) -> list[int]:
    from crossjax.errors import CrossjaxError
    try:
        layers = [int(v) for v in values]
    except (TypeError, ValueError):
        raise CrossjaxError(f"--layers={','.join(values or [])} must be comma-separated layer numbers, e.g. "
                            "--layers=0,1,2,3") from None
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise CrossjaxError(f"--layers={','.join(values or [])} must list distinct layers >= 0, e.g. --layers=0,1,2,3")
    return layers


def main() -> None:
    import jax
    rows = sweep(cli.CONFIG.value, cli.WORKDIR.value, parse_layers(LAYERS.value), HOOK.value)
    if jax.process_index() == 0:
        print(table(rows))
        print(f"sweep: {os.path.join(cli.WORKDIR.value, SWEEP_FILE)}")


if __name__ == "__main__":
    flags.mark_flag_as_required("layers")
    cli.main("layer_sweep", main)
