"""Train a crosscoder from the command line (the work is in crossjax.trainer.run).

    python -m crossjax.train --config=experiments/synthetic.py:quick --workdir=/tmp/xj
    python -m crossjax.train --config=experiments/synthetic.py:quick --config.train.lr=1e-3 --workdir=/tmp/xj2

Missing stages (offline suite, activations, planted store) run first; the same command again resumes from the
latest checkpoint. Multi-host: add --distributed (cluster auto-detection), or on one machine
--distributed --coordinator=127.0.0.1:PORT --num_processes=N --process_id=I.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment file with get_config(arg), e.g. experiments/synthetic.py:quick", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, export and summary.json")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() before anything else")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "with --distributed: coordinator address host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter (checkpoint threads) hides the progress
    import jax
    if _DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    from crossjax import trainer
    from crossjax.errors import CrossjaxError
    try:
        summary = trainer.run(_CONFIG.value, _WORKDIR.value)
    except CrossjaxError as e:
        print(f"crossjax.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        ev = summary["eval"].get("ev_mean")
        print(f"done: {summary['steps']} steps, {summary['tokens']} tokens"
              + (f", held-out EV {ev:.4f}" if ev is not None else ""))
        if "recovery" in summary:
            r = summary["recovery"]
            print(f"planted recovery: mean max cosine {r['mean_max_cos']:.3f}, "
                  f"fraction above {r['threshold']}: {r['frac_above']:.3f}")
            if "emergence_accuracy" in r:
                print(f"emergence snapshot of the {r['num_emergent']} emergent features: exact "
                      f"{r['emergence_accuracy']:.2f}, within one {r['emergence_within_one']:.2f}")
        _print_per_snapshot(summary)
        print(f"summary: {summary['workdir']}/summary.json  metrics: {summary['workdir']}/metrics.jsonl  "
              f"tensorboard: {summary['workdir']}/tb  weights: {summary['export']}")


def _print_per_snapshot(summary: dict) -> None:
    """Held-out EV and L0 per snapshot, and when the features form (the headline numbers of a run)."""
    ev, l0 = summary["eval"].get("ev"), summary["eval"].get("l0")
    if ev is None or l0 is None:
        return
    names = summary["snapshots"]
    width = max(len(n) for n in names)
    print(f"{'snapshot':<{width}}  held-out EV     L0")
    for name, e, n in zip(names, ev, l0):
        print(f"{name:<{width}}  {e:11.4f}  {n:5.1f}")
    spliced = summary.get("spliced")
    if spliced:
        print(f"{'snapshot':<{width}}  clean loss  spliced loss  zero-ablated  loss recovered")
        for name in names:
            r = spliced[name]
            print(f"{name:<{width}}  {r['clean_loss']:10.4f}  {r['spliced_loss']:12.4f}  {r['zero_ablated_loss']:12.4f}"
                  f"  {r['loss_recovered']:14.3f}")
    evolution = summary.get("evolution")
    if evolution:
        kinds = ", ".join(f"{k} {v}" for k, v in evolution["kinds"].items() if v)
        print(f"features by kind: {kinds}")
        emerged = ", ".join(f"{k}: {v}" for k, v in evolution["emergent_features_by_snapshot"].items() if v)
        print(f"emergent features by the snapshot where their decoder norm first reaches "
              f"{evolution['emergence_threshold']:g} of its peak: {emerged or 'none'}")


def unknown_override(config, argv) -> str | None:
    """The first `--config.a.b=...` in argv naming a key the config lacks, as a message listing the valid keys."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split("[", 1)[0]
        node, seen = config, "config"
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node.keys():
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                return (f"unknown config key {seen}.{part} (in {arg}); valid keys of {seen}: {', '.join(valid)}")
            node, seen = node[part], f"{seen}.{part}"
    return None


def _parse_flags(argv):
    """absl flag parsing, with a readable message for a misspelled --config.* override."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.IllegalFlagValueError) as e:
        try:
            problem = unknown_override(_load_config_file(argv), argv)
        except Exception:  # the config file itself is broken: its own error below says how
            problem = None
        print(f"crossjax.train: error: {problem or e}", file=sys.stderr)
        sys.exit(2)


def _load_config_file(argv):
    """The un-overridden config named by --config=path[:arg] (the flag keeps nothing when an override fails)."""
    import importlib.util
    spec_arg = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    path, _, arg = spec_arg.partition(":")
    spec = importlib.util.spec_from_file_location("crossjax_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
