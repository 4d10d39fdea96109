"""What every crossjax command shares: the --config/--workdir/--distributed flags, their parsing, and one place
that turns bad input into a short message and exit code 2.

    python -m crossjax.<command> --config=experiments/x.py[:variant] [--config.a.b=v ...] --workdir=DIR
        [--distributed [--coordinator=HOST:PORT --num_processes=N --process_id=I]]

The experiment file is loaded by configs.load_experiment before absl parses the overrides, so a missing file, a
syntax error or a variant typo reads as one line naming the fix, and a misspelled override lists the valid keys.
"""
from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from crossjax.errors import CrossjaxError

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment file with get_config(arg), e.g. experiments/synthetic.py:quick", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, export and summary.json")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() before anything else")
COORDINATOR = flags.DEFINE_string("coordinator", None, "with --distributed: coordinator address host:port")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --distributed: number of processes")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --distributed: this process's index")
flags.mark_flags_as_required(["config", "workdir"])


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


def _fail(command: str, message) -> None:
    print(f"crossjax.{command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def flags_parser(command: str) -> Callable[[list[str]], list[str]]:
    """An absl flags_parser: the experiment file first (clear errors), then the flags and overrides."""
    def parse(argv: list[str]) -> list[str]:
        from crossjax import configs
        spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        config = None
        if spec is not None:
            try:
                config = configs.load_experiment(spec)
            except CrossjaxError as e:
                _fail(command, e)
        try:
            return FLAGS(argv)
        except (AttributeError, KeyError, flags.IllegalFlagValueError, flags.Error) as e:
            _fail(command, (unknown_override(config, argv) if config is not None else None) or e)
    return parse


def run(command: str, body: Callable[[], None]) -> None:
    """Start jax.distributed if asked, then body(); a CrossjaxError is printed as one line with exit code 2."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter (checkpoint threads) hides the progress
    import jax
    if DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                                   process_id=PROCESS_ID.value)
    try:
        body()
    except CrossjaxError as e:
        _fail(command, e)


def main(command: str, body: Callable[[], None]) -> None:
    """`app.run` for a crossjax command whose work is body() (it reads CONFIG.value and WORKDIR.value)."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(command, body)
    app.run(absl_main, flags_parser=flags_parser(command))
