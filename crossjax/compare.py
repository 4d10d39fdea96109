"""Crosscoder vs per-snapshot SAEs on the same store, with the same code and settings (the paper's first result).

    python -m crossjax.compare --config=experiments/tiny.py --workdir=runs/tiny [--snapshots=step0,step1600]

Ensures the crosscoder run in WORKDIR (the same as `python -m crossjax.train` with these flags: it resumes or
reuses a finished run), then trains, for each snapshot, an S=1 crosscoder (an ordinary SAE) with every other
setting unchanged on that snapshot's column of the same activation store, in WORKDIR/sae/<snapshot>/ (each
resumable). Writes WORKDIR/compare.json and prints a table of held-out explained variance and L0 per snapshot.
"""
from __future__ import annotations

import copy
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (as for crossjax.train)")
_WORKDIR = flags.DEFINE_string("workdir", None, "the crosscoder run's directory; SAEs go to WORKDIR/sae/<snapshot>")
_SNAPSHOTS = flags.DEFINE_list("snapshots", [], "compare only these snapshots (default: every snapshot trained on)")
flags.mark_flags_as_required(["config", "workdir"])


def sae_config(config, workdir: str, snapshot: str):
    """The crosscoder's config restricted to one snapshot of the crosscoder run's store."""
    from crossjax import store as store_lib
    sae = copy.deepcopy(config)
    sae.store.path = store_lib.resolve_url(config.store.path, os.path.abspath(workdir))
    sae.data.snapshots = snapshot
    return sae


def compare(config, workdir: str, snapshots: list[str] | None = None) -> dict:
    """Train (or reuse) the crosscoder and one SAE per snapshot; return and write the comparison.

    Returns {"snapshots": [...], "crosscoder": {"ev": [...], "l0": [...]}, "sae": {"ev": [...], "l0": [...]},
    "sae_workdirs": [...]}, figures from each run's held-out evaluation (PAPER.md's explained variance).
    """
    from crossjax import trainer
    from crossjax.errors import CrossjaxError
    from crossjax.files import atomic_write_text

    workdir = os.path.abspath(workdir)
    cc = trainer.run(config, workdir)
    names = list(cc["snapshots"])
    wanted = list(snapshots) if snapshots else names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise CrossjaxError(f"--snapshots names {unknown}, which the crosscoder in {workdir} was not trained on; "
                            f"choose from {names}")
    result = {"snapshots": wanted, "crosscoder": {"ev": [], "l0": []}, "sae": {"ev": [], "l0": []},
              "sae_workdirs": [], "num_features": cc["num_features"], "steps": cc["steps"]}
    for name in wanted:
        s = names.index(name)
        sae_dir = os.path.join(workdir, "sae", name)
        sae = trainer.run(sae_config(config, workdir, name), sae_dir)
        result["crosscoder"]["ev"].append(cc["eval"]["ev"][s])
        result["crosscoder"]["l0"].append(cc["eval"]["l0"][s])
        result["sae"]["ev"].append(sae["eval"]["ev"][0])
        result["sae"]["l0"].append(sae["eval"]["l0"][0])
        result["sae_workdirs"].append(sae_dir)
    atomic_write_text(os.path.join(workdir, "compare.json"), json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict) -> str:
    """A markdown table of the comparison."""
    lines = ["| snapshot | crosscoder EV | SAE EV | crosscoder L0 | SAE L0 |", "|---|---|---|---|---|"]
    cc, sae = result["crosscoder"], result["sae"]
    for i, name in enumerate(result["snapshots"]):
        lines.append(f"| {name} | {cc['ev'][i]:.4f} | {sae['ev'][i]:.4f} | {cc['l0'][i]:.1f} | {sae['l0'][i]:.1f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep the libraries' INFO chatter out of the table's way
    from crossjax.errors import CrossjaxError
    try:
        result = compare(_CONFIG.value, _WORKDIR.value, _SNAPSHOTS.value)
    except CrossjaxError as e:
        print(f"crossjax.compare: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(result))
    print(f"comparison: {os.path.join(os.path.abspath(_WORKDIR.value), 'compare.json')}")


if __name__ == "__main__":
    app.run(main)
