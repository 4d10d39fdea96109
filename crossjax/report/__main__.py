"""Write the report of a finished run (crossjax/report/__init__.py says what it holds).

    python -m crossjax.report --workdir=/tmp/crossjax_tiny [--context_features=200] [--contexts_per_snapshot=10]
        [--index_rows=131072] [--nocontexts] [--coordinator=HOST:PORT --num_processes=N --process_id=I]

prints `report: DIR/report/index.html (file://...)` (for a gs:// DIR: the object's gs:// URL). It needs no --config: the run's settings are read from
DIR/config.json and DIR/summary.json. On several hosts (jax.distributed joined from the environment or the
coordinator flags, as for crossjax.train) the processes share the feature index's pass over the store and process 0
writes the report. Errors (an unfinished run, a damaged file) are one line and exit code 2, as
for every crossjax command (crossjax/cli.py).
"""
from __future__ import annotations

import pathlib
import sys

from absl import flags

from crossjax import cli, paths

FLAGS = flags.FlagValues()   # its own flags: the shared ones of crossjax/cli.py require --config
flags.DEFINE_string("workdir", None, "the finished run's workdir (holds summary.json and export/)", flag_values=FLAGS)
flags.DEFINE_bool("contexts", True, "collect frequencies and top contexts over the run's store", flag_values=FLAGS)
flags.DEFINE_integer("context_features", 200, "features (the most frequent) whose pages show top contexts",
                     flag_values=FLAGS)
flags.DEFINE_integer("contexts_per_snapshot", 10, "top contexts kept per feature", flag_values=FLAGS)
flags.DEFINE_integer("index_rows", 131072, "store rows the feature index scans", flag_values=FLAGS)

join_processes = cli.define_distributed_flags(FLAGS)

_USAGE = ("usage: python -m crossjax.report --workdir=DIR [--context_features=N] [--index_rows=N] [--nocontexts] "
          "[--coordinator=HOST:PORT --num_processes=N --process_id=I]")


def main(argv: list[str]) -> int:
    """argv as sys.argv (program name first); returns the exit code."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\n" + FLAGS.get_help())
        return 0
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"crossjax.report: error: {e}\n{_USAGE}", file=sys.stderr)
        return 2
    if len(rest) > 1 or not FLAGS.workdir:
        what = f"unexpected arguments {rest[1:]}" if len(rest) > 1 else "--workdir is required"
        print(f"crossjax.report: error: {what}\n{_USAGE}", file=sys.stderr)
        return 2

    def body() -> None:
        join_processes()       # several hosts read the store's rows between them; process 0 writes the report
        import jax

        from crossjax.report import write_report
        index = write_report(FLAGS.workdir, contexts=FLAGS.contexts, context_features=FLAGS.context_features,
                             contexts_per_snapshot=FLAGS.contexts_per_snapshot, index_rows=FLAGS.index_rows)
        if jax.process_index() == 0 and paths.is_gcs(index):   # no file:// URL for an object in a bucket
            print(f"report: {index}")
        elif jax.process_index() == 0:
            print(f"report: {index} ({pathlib.Path(index).resolve().as_uri()})")

    cli.run("report", body)    # bad input or state: one line and exit code 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
