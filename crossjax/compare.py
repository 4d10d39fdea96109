"""Crosscoder vs per-snapshot SAEs on the same store, with the same code and settings (the paper's first result).

    python -m crossjax.compare --config=experiments/tiny.py --workdir=/tmp/crossjax_tiny [--snapshots=step0,step1600]

The flags are those of `python -m crossjax.train` (--config with its `--config.a.b=v` overrides, --workdir,
--distributed ...) plus --snapshots. It ensures the crosscoder run in WORKDIR (what crossjax.train with these
flags does: it resumes, or re-evaluates a finished run), then, for each snapshot, trains an S=1 crosscoder (an
ordinary SAE) with every other setting unchanged (features, steps, batch, lr and lambda schedules, seed, held-out
blocks) on that snapshot's column of the crosscoder's activation store, in WORKDIR/sae/<snapshot>/ (each a
resumable trainer workdir; the store is read, never rewritten). It writes WORKDIR/compare.json and prints

    | snapshot | crosscoder EV | SAE EV | crosscoder L0 | SAE L0 |

from each run's held-out evaluation (summary.json: PAPER.md's explained variance and L0), then, where both runs
measured them, the planted-feature recovery (synthetic data) or the spliced-in LM loss (model snapshots).
"""
from __future__ import annotations

import copy
import json
import os

from absl import flags

# --config (with overrides), --workdir and the --distributed flags: exactly those of crossjax.train.
from crossjax import cli, console

_SNAPSHOTS = flags.DEFINE_list("snapshots", [], "compare only these snapshots (default: every snapshot the "
                               "crosscoder is trained on)")


def sae_config(config, store_url: str, snapshot: str):
    """The crosscoder's config restricted to one snapshot of the store at store_url (an S=1 crosscoder: an SAE).

    The mesh's snapshot axis folds into the data axis (one snapshot cannot be split); mesh keys do not change
    the numbers trained.
    """
    sae = copy.deepcopy(config)
    sae.store.path = store_url
    sae.data.snapshots = snapshot
    snap_ax = int(sae.mesh.snapshot)
    if snap_ax != 1:
        if int(sae.mesh.data) > 0:
            sae.mesh.data = int(sae.mesh.data) * snap_ax
        sae.mesh.snapshot = 1
    return sae


def compare(config, workdir: str, snapshots: list[str] | None = None) -> dict:
    """Train (or reuse) the crosscoder and one SAE per snapshot; return and write WORKDIR/compare.json.

    snapshots: names among those the crosscoder is trained on (default: all of them).
    Returns {"snapshots": [...], "crosscoder": {"ev": [...], "l0": [...]}, "sae": {"ev": [...], "l0": [...]},
    "sae_workdirs": [...], "store", "num_features", "steps", "batch_size"}: per snapshot, held-out figures from
    each run's summary.json. Planted data adds "max_cos" to both sides (mean best cosine to the true features
    present at that snapshot); model snapshots with eval.spliced_tokens add "spliced_loss" and "loss_recovered".
    """
    from crossjax import locks, workdir as workdir_lib

    workdir = workdir_lib.prepare(workdir)
    with locks.hold_workdir(workdir):  # for the whole comparison: its SAE runs and compare.json live in it too
        return _compare(config, workdir, snapshots)


def _compare(config, workdir: str, snapshots: list[str] | None) -> dict:
    """compare() with the workdir held."""
    import jax

    from crossjax import store as store_lib
    from crossjax import pipeline
    from crossjax.errors import CrossjaxError
    from crossjax.files import atomic_write_text

    console.say("compare", f"the crosscoder in {workdir}")
    cc = pipeline.run(config, workdir)
    names = list(cc.snapshots)
    wanted = list(snapshots) if snapshots else names
    unknown = [s for s in wanted if s not in names]
    if unknown or len(set(wanted)) != len(wanted):
        raise CrossjaxError(f"--snapshots={','.join(wanted)} must name distinct snapshots the crosscoder in {workdir} "
                            f"was trained on" + (f" (unknown: {unknown})" if unknown else "")
                            + f"; choose from {names}")
    store = store_lib.ActivationStore.open(cc.store)  # made and checked by the crosscoder run just now
    result = {"snapshots": wanted, "crosscoder": _side(), "sae": _side(), "sae_workdirs": [],
              "store": cc.store, "num_features": cc.num_features, "steps": cc.steps,
              "batch_size": int(config.train.batch_size)}
    for i, name in enumerate(wanted):
        sae_dir = os.path.join(workdir, "sae", name)
        console.say("compare", f"SAE {i + 1}/{len(wanted)} on {name} in {sae_dir}")
        sae = pipeline.run(sae_config(config, cc.store, name), sae_dir, store=store)
        if sae.snapshots != [name]:
            raise CrossjaxError(f"{sae_dir}/summary.json is for snapshots {sae.snapshots}, not [{name!r}]")
        _add(result["crosscoder"], cc, names.index(name), name)
        _add(result["sae"], sae, 0, name)
        result["sae_workdirs"].append(sae_dir)
    for key in ("max_cos", "spliced_loss", "loss_recovered"):  # only what both sides measured
        if key not in result["crosscoder"] or key not in result["sae"]:
            result["crosscoder"].pop(key, None), result["sae"].pop(key, None)
    if jax.process_index() == 0:
        atomic_write_text(os.path.join(workdir, "compare.json"), json.dumps(result, indent=1) + "\n")
    return result


def _side() -> dict:
    return {"ev": [], "l0": []}


def _add(side: dict, summary, s: int, name: str) -> None:
    """Append snapshot s of a run's RunSummary to one side of the comparison."""
    side["ev"].append(summary.heldout["ev"][s])
    side["l0"].append(summary.heldout["l0"][s])
    recovery = summary.evals.get("recovery")
    if recovery is not None:
        side.setdefault("max_cos", []).append(recovery["mean_max_cos_per_snapshot"][s])
    spliced = summary.evals.get("spliced")
    if spliced is not None:
        side.setdefault("spliced_loss", []).append(spliced[name]["spliced_loss"])
        side.setdefault("loss_recovered", []).append(spliced[name]["loss_recovered"])


def table(result: dict) -> str:
    """The comparison as markdown: held-out EV and L0 per snapshot, then recovery or spliced loss if measured."""
    cc, sae = result["crosscoder"], result["sae"]
    lines = ["| snapshot | crosscoder EV | SAE EV | crosscoder L0 | SAE L0 |", "|---|---|---|---|---|"]
    for i, name in enumerate(result["snapshots"]):
        lines.append(f"| {name} | {cc['ev'][i]:.4f} | {sae['ev'][i]:.4f} | {cc['l0'][i]:.1f} | {sae['l0'][i]:.1f} |")
    if "max_cos" in cc:
        lines += ["", "| snapshot | crosscoder max cos | SAE max cos |", "|---|---|---|"]
        lines += [f"| {name} | {cc['max_cos'][i]:.3f} | {sae['max_cos'][i]:.3f} |"
                  for i, name in enumerate(result["snapshots"])]
    if "spliced_loss" in cc:
        lines += ["", "| snapshot | crosscoder spliced loss | SAE spliced loss | crosscoder loss recovered "
                  "| SAE loss recovered |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {cc['spliced_loss'][i]:.4f} | {sae['spliced_loss'][i]:.4f} | "
                  f"{cc['loss_recovered'][i]:.3f} | {sae['loss_recovered'][i]:.3f} |"
                  for i, name in enumerate(result["snapshots"])]
    return "\n".join(lines)


def _compare_command() -> None:
    import jax
    result = compare(cli.CONFIG.value, cli.WORKDIR.value, _SNAPSHOTS.value)
    if jax.process_index() == 0:
        print(table(result))
        print(f"comparison: {os.path.join(os.path.abspath(cli.WORKDIR.value), 'compare.json')}")


if __name__ == "__main__":
    cli.main("compare", _compare_command)
