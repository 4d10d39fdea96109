"""What every crossjax command shares: the --config/--workdir/--distributed flags, their parsing, and one place
(`run`) that turns bad input into a short message and exit code 2, while a bug keeps its traceback.

    python -m crossjax.<command> --config=experiments/x.py[:variant] [--config.a.b=v ...] --workdir=DIR
        [--distributed [--coordinator=HOST:PORT --num_processes=N --process_id=I]]

The experiment file is loaded by configs.load_experiment before absl parses the overrides, so a missing file, a
syntax error or a variant typo reads as one line naming the fix, and a misspelled override lists the valid keys.
"""
from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import re
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
    """body(), with the one rule for errors of every command: bad input or state the user can fix (a
    CrossjaxError, or an expected OS, JSON or safetensors error) is printed as one short message with its fix and
    exit code 2; any other exception is a bug in crossjax and propagates with its traceback."""
    try:
        body()
    except Exception as e:
        message = expected_error(e)
        if message is None:
            raise
        _fail(command, message)


_TS_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_TS_FILE = re.compile(r'(?:local file|directory):? "([^"]+)"')


def expected_error(e: BaseException) -> str | None:
    """The message for an error the user can fix, None for anything else (a bug)."""
    if isinstance(e, CrossjaxError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_message(e)
    if isinstance(e, json.JSONDecodeError):
        return (f"a JSON file that crossjax reads is damaged, e.g. truncated ({e}); write it again with the command "
                "that made it")
    if type(e).__name__ == "SafetensorError":
        return (f"a safetensors file is damaged or is not a safetensors file ({e}); write it again with the command "
                "that made it (for a model snapshot: download or build it again)")
    if isinstance(e, ValueError):  # tensorstore reports a failed read or write as ValueError with the OS error code
        code = _TS_OS_ERROR.search(str(e))
        if code is not None:
            path = _TS_FILE.search(str(e))
            errnum = int(code.group(1))
            return os_error_message(OSError(errnum, os.strerror(errnum), path.group(1) if path else None))
    return None


def os_error_message(e: OSError) -> str:
    """An OS error as what happened to which file, and what to do about it."""
    where = f" {e.filename}" if e.filename else ""
    workdir = f" (--workdir={WORKDIR.value})" if "workdir" in FLAGS and FLAGS["workdir"].present else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = e.filename or f"the run's files{workdir}"
        return (f"no space left while writing {what} ({e.strerror}): "
                "free space on that file system, or point --workdir or store.path at one with room, then run the "
                "same command again: it resumes from what was finished")
    if e.errno == errno.EROFS:
        return (f"cannot write{where or workdir}: it is on a read-only file system; choose a --workdir (or "
                "store.path) on a writable one")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"permission denied for{where or workdir} ({e.strerror}): fix its permissions, or choose another "
                "--workdir or store.path")
    if e.errno == errno.ENOENT:
        return f"{e.filename or 'a file'} does not exist ({e.strerror}): check the path"
    return f"{e.strerror or e}{':' + where if where else ''}"


class _LogLinesWithoutTracebacks(std_logging.Filter):
    """Orbax's checkpoint threads log an error with its traceback, then raise it again in the main thread, where
    run() reports it (with the traceback, when it is a bug): the log line stays, its traceback goes."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _start(body: Callable[[], None]) -> Callable[[], None]:
    """body preceded by the logging settings and, with --distributed, jax.distributed.initialize()."""
    def started() -> None:
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter (checkpoint threads) hides progress
            logging.get_absl_handler().addFilter(_LogLinesWithoutTracebacks())
        if DISTRIBUTED.value:
            import jax
            jax.distributed.initialize(coordinator_address=COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                                       process_id=PROCESS_ID.value)
        body()
    return started


def main(command: str, body: Callable[[], None]) -> None:
    """`app.run` for a crossjax command whose work is body() (it reads CONFIG.value and WORKDIR.value)."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(command, _start(body))
    app.run(absl_main, flags_parser=flags_parser(command))
