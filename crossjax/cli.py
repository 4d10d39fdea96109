"""What every crossjax command shares: the --config/--workdir/--distributed flags, their parsing, and one place
(`run`) that turns bad input into a short message and exit code 2, while a bug keeps its traceback.

    python -m crossjax.<command> --config=experiments/x.py[:variant] [--config.a.b=v ...] --workdir=DIR
        [--coordinator=HOST:PORT --num_processes=N --process_id=I] [--[no]distributed]

Multi-host (`initialize_distributed`): jax.distributed joins the processes of a run when the environment shows
one (a Cloud TPU VM; a SLURM step of several tasks started by srun) or the coordinator flags are given; a process
on its own host with neither is left alone. --distributed also asks for it elsewhere (jax's own cluster
detection: Open MPI, Kubernetes, ...); --nodistributed never joins.

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
from typing import Callable, Mapping

from absl import app, flags, logging
from ml_collections import config_flags

from crossjax.errors import CrossjaxError

FLAGS = flags.FLAGS
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment file with get_config(arg), e.g. experiments/synthetic.py:quick", lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, export and summary.json")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "join the run's other processes (jax.distributed.initialize) before anything else; default: "
    "when the environment is a TPU VM or a multi-task SLURM step, or --coordinator is given; --nodistributed: never")
COORDINATOR = flags.DEFINE_string("coordinator", None, "coordinator address host:port (process 0's host)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with --coordinator: number of processes")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "with --coordinator: this process's index")
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


def _fail(command: str, message, *, at_once: bool = False) -> None:
    if at_once:  # nothing logged by a library's thread may follow the message
        std_logging.disable(std_logging.CRITICAL)
    print(f"crossjax.{command}: error: {message}", file=sys.stderr)
    if at_once:
        # a command process ends here: the libraries' exit handlers (tensorboard's flush, orbax's async threads)
        # would fail again on the same full disk or closed file and print their tracebacks after the message
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
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


def run(command: str, body: Callable[[], None], *, exit_at_once: bool = False) -> None:
    """body(), with the one rule for errors of every command: bad input or state the user can fix (a
    CrossjaxError, or an expected OS, JSON or safetensors error) is printed as one short message with its fix and
    exit code 2; any other exception is a bug in crossjax and propagates with its traceback. exit_at_once: the
    process is a command's own (main): it exits without running exit handlers, so the message stays the last line
    (SystemExit otherwise, for a main() called from Python)."""
    try:
        body()
    except Exception as e:
        message = expected_error(e)
        if message is None:
            raise
        _fail(command, message, at_once=exit_at_once)


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
    """body preceded by the logging settings and, for a multi-host run, jax.distributed.initialize()."""
    def started() -> None:
        if not FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # the libraries' INFO chatter (checkpoint threads) hides progress
            logging.get_absl_handler().addFilter(_LogLinesWithoutTracebacks())
        initialize_distributed(DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
        body()
    return started


def distributed_settings(requested: bool | None, coordinator: str | None, num_processes: int | None,
                         process_id: int | None, environ: Mapping[str, str], tpu_vm: bool) -> dict | None:
    """Keyword arguments for jax.distributed.initialize (an empty dict: jax reads the cluster's environment), or
    None when this process runs alone. requested: --distributed (True), --nodistributed (False) or neither."""
    explicit = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if requested is False:
        if given:
            raise CrossjaxError(f"--nodistributed and {', '.join(given)} contradict each other: drop one of them")
        return None
    if given:
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise CrossjaxError(f"--coordinator, --num_processes and --process_id go together: {', '.join(missing)} "
                                "missing (e.g. --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0 on the "
                                "first host)")
        if not re.fullmatch(r"\S+:\d+", coordinator):
            raise CrossjaxError(f"--coordinator={coordinator}: give HOST:PORT of process 0, e.g. 10.0.0.1:1234")
        if not (num_processes >= 1 and 0 <= process_id < num_processes):
            raise CrossjaxError(f"--process_id={process_id} with --num_processes={num_processes}: the index must lie "
                                f"in 0..{num_processes - 1}")
        return dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    tasks = _slurm_tasks(environ)
    if tasks > 1:
        lacking = [v for v in ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID") if v not in environ]
        if lacking:
            raise CrossjaxError(f"this SLURM job has {tasks} tasks but {', '.join(lacking)} is not set, so this "
                                "process was not started by srun: start the command with srun (see "
                                "launch/gpu_slurm.sbatch), or pass --nodistributed to run it alone")
        return {}
    return {} if tpu_vm or requested else None


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    """The task count of the SLURM job step this process belongs to (1 outside SLURM)."""
    if "SLURM_JOB_ID" not in environ:
        return 1
    try:
        return int(environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS") or 1)
    except ValueError:
        return 1


def on_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu installed and TPU chips attached (the device files, without starting JAX)."""
    import glob
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None and bool(glob.glob("/dev/accel*") or
                                                                   glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(requested: bool | None, coordinator: str | None, num_processes: int | None,
                           process_id: int | None, environ: Mapping[str, str] | None = None) -> bool:
    """jax.distributed.initialize when `distributed_settings` says so (before any other JAX call); whether it
    joined. A failure to join is a CrossjaxError naming the settings and the fix."""
    environ = os.environ if environ is None else environ
    settings = distributed_settings(requested, coordinator, num_processes, process_id, environ, on_tpu_vm())
    if settings is None:
        return False
    import jax
    try:
        jax.distributed.initialize(**settings)
    except (RuntimeError, ValueError) as e:
        source = ("the given --coordinator flags" if settings else
                  f"the SLURM environment (job {environ['SLURM_JOB_ID']})" if _slurm_tasks(environ) > 1 else
                  "the environment")
        raise CrossjaxError(f"jax.distributed could not join the run's processes from {source}: {e}. Give "
                            "--coordinator=HOST:PORT --num_processes=N --process_id=I, or --nodistributed to run this "
                            "process alone") from e
    return True


def define_distributed_flags(flag_values: flags.FlagValues) -> Callable[[], bool]:
    """The --[no]distributed, --coordinator, --num_processes and --process_id flags on a command's own flag set (the
    commands that read a finished workdir and take no --config); returns the function that joins the run's
    processes with their values (initialize_distributed), to be called before the command's work."""
    for name in ("distributed", "coordinator", "num_processes", "process_id"):
        holder = FLAGS[name]
        define = {"distributed": flags.DEFINE_bool, "coordinator": flags.DEFINE_string}.get(name, flags.DEFINE_integer)
        define(name, None, holder.help, flag_values=flag_values)
    return lambda: initialize_distributed(flag_values["distributed"].value, flag_values["coordinator"].value,
                                          flag_values["num_processes"].value, flag_values["process_id"].value)


def main(command: str, body: Callable[[], None]) -> None:
    """`app.run` for a crossjax command whose work is body() (it reads CONFIG.value and WORKDIR.value)."""
    def absl_main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run(command, _start(body), exit_at_once=True)
    app.run(absl_main, flags_parser=flags_parser(command))
