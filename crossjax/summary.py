"""The run summary: what a finished crosscoder run produced, written once as workdir/summary.json.

Every reader (the train and compare commands, FeatureIndex, the launch scripts' completion check) goes through
`RunSummary.read`, never through string keys of a JSON dict, so a renamed field is a failing import, not a silent
KeyError elsewhere. `version` changes when a field changes meaning; an older or newer file gets a clear error.

Evaluator results live in `evals`, keyed by the evaluator's name (`config.evals`): `evals["heldout"]` holds the
held-out EV/L0/dead figures, `evals["recovery"]` the planted-feature recovery, `evals["spliced"]` the spliced-in
loss per snapshot. Non-finite numbers are written as null (JSON has no NaN) and read back as NaN.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from crossjax import paths
from crossjax.errors import CrossjaxError

SUMMARY_FILE = "summary.json"
VERSION = 2  # 1: the untyped dict before evaluators (eval/recovery/spliced at the top level)


@dataclasses.dataclass
class RunSummary:
    workdir: str                    # absolute path of the run's workdir when it finished
    store: str                      # URL of the activation store trained on
    steps: int                      # training steps (updates)
    tokens: int                     # rows (tokens) seen in training: steps * batch
    snapshots: list[str]            # the S snapshots trained on, in store order
    num_features: int
    init_norm: float                # initial decoder row norm (grid-searched or given)
    scales: list[float]             # [S] per-snapshot normalisation scales applied to the stored activations
    export: str                     # directory of the exported weights (safetensors + config.json)
    evolution: dict[str, Any]       # analysis.evolution.summarise of the final decoder
    evals: dict[str, dict]          # evaluator name -> its JSON result
    version: int = VERSION

    @property
    def heldout(self) -> dict:
        """The held-out evaluation: ev [S], ev_legacy [S], ev_mean, l0 [S], l0_mean, mse [S], dead_frac, rows."""
        return self.evals.get("heldout", {})

    def write(self, workdir: str | None = None) -> str:
        """Write workdir/summary.json atomically (default: self.workdir; a local path or gs://); return its path."""
        path = paths.join(workdir or self.workdir, SUMMARY_FILE)
        text = json.dumps(_finite_or_null(dataclasses.asdict(self)), indent=1, allow_nan=False)
        paths.write_text(path, text + "\n")
        return path

    @classmethod
    def read(cls, workdir_or_file: str | os.PathLike) -> RunSummary:
        """Read a workdir's summary.json (or the file itself; local or gs://); CrossjaxError when it is missing or
        malformed."""
        path = paths.check_supported(workdir_or_file, "the run summary's location")
        if paths.isdir(path):
            path = paths.join(path, SUMMARY_FILE)
        try:
            raw = json.loads(paths.read_bytes(path))
        except FileNotFoundError:
            raise CrossjaxError(f"{path} does not exist: the run has not finished; run python -m crossjax.train "
                                "with the same --config and --workdir to finish it") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrossjaxError(f"{path} is not valid JSON ({e}); rerun the same training command to rewrite it") from e
        return cls.from_dict(raw, where=path)

    @classmethod
    def from_dict(cls, raw: Any, *, where: str = SUMMARY_FILE) -> RunSummary:
        if not isinstance(raw, dict):
            raise CrossjaxError(f"{where} holds {type(raw).__name__}, not a run summary; rerun training to rewrite it")
        version = raw.get("version", 1)
        if version != VERSION:
            raise CrossjaxError(f"{where} is a run summary of version {version}; this crossjax reads version "
                                f"{VERSION}. Rerun the same training command (it re-evaluates a finished run and "
                                "rewrites the summary) or use the crossjax that wrote it")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - raw.keys() - {"version"})
        if missing:
            raise CrossjaxError(f"{where} lacks {missing}; rerun the same training command to rewrite it")
        return cls(**{k: _null_to_nan(raw[k]) for k in fields if k in raw})


def _finite_or_null(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _null_to_nan(value):
    # only inside lists of numbers: a null there was a non-finite number; a null field stays None
    if isinstance(value, dict):
        return {k: _null_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [math.nan if v is None else _null_to_nan(v) for v in value]
    return value


def main(argv: list[str]) -> int:
    """`python -m crossjax.summary WORKDIR`: exit 0 when WORKDIR holds a finished run's valid summary (printing
    its headline), 2 otherwise (launch scripts use it to tell a finished run from a stopped one)."""
    import sys

    from crossjax import cli
    if len(argv) != 1:
        print("usage: python -m crossjax.summary WORKDIR", file=sys.stderr)
        return 2

    def headline() -> None:
        summary = RunSummary.read(argv[0])
        ev = summary.heldout.get("ev_mean")
        print(f"finished: {summary.steps} steps, {summary.tokens} tokens"
              + (f", held-out EV {ev:.4f}" if ev is not None else "") + f"; weights: {summary.export}")

    cli.run("summary", headline)  # an unfinished or damaged run: one line and exit code 2
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
