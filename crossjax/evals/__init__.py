"""Evaluations of a trained crosscoder, as plug-ins named in `config.evals`.

An evaluator is a module `crossjax/evals/<name>.py` with one function

    def evaluate(run: RunContext) -> dict | None

that measures something about the finished run and returns a JSON-ready dict (stored in the run summary as
`evals[<name>]`), or None when it does not apply to this run (planted recovery on model snapshots, say). Adding an
evaluation is adding one such file and naming it in `config.evals` (comma-separated, run in that order); it may
also define `check(config)`, run by `check` before any stage, to refuse its bad settings early.
The pipeline runs the list at the end of every run; `crossjax.compare` runs the same list on each SAE.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from typing import Any

import numpy as np

from crossjax.errors import CrossjaxError


@dataclasses.dataclass
class RunContext:
    """Everything an evaluator may read about a finished run; `params` live on the mesh (sharded)."""
    config: Any                           # the run's ConfigDict
    workdir: str
    store: Any                            # the ActivationStore trained on
    snapshots: tuple[str, ...]            # names of the S trained snapshots
    snapshot_indices: list[int] | None    # their store indices (None: all snapshots, in store order)
    scales: np.ndarray                    # [S] normalisation scales
    heldout_blocks: tuple[int, ...]       # store blocks never trained on
    crosscoder: Any                       # crosscoder.CrosscoderConfig
    shardings: dict                       # mesh, batch, params, state
    params: dict | None = None            # the final parameters (sharded jax.Arrays)
    export_dir: str | None = None         # the exported weights (safetensors + config.json), once written
    cache: dict = dataclasses.field(default_factory=dict)  # evaluators' compiled functions, kept across calls

    @functools.cached_property
    def host_params(self) -> dict[str, np.ndarray]:
        """The final parameters gathered to this host as numpy arrays."""
        import jax
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(self.params, tiled=True)
        return jax.device_get(self.params)


def names(spec: str) -> list[str]:
    """config.evals ("heldout,recovery,spliced") as a list of evaluator names, each checked to exist."""
    out = [n.strip() for n in str(spec).split(",") if n.strip()]
    unknown = [n for n in out if importlib.util.find_spec(f"{__name__}.{n}") is None]
    if unknown:
        raise CrossjaxError(f"evals={spec!r} names unknown evaluator(s) {unknown}; each must be a module of "
                            f"crossjax/evals/ ({', '.join(available())})")
    return out


def check(spec: str, config) -> None:
    """Before any stage runs: each named evaluator's own check of its config keys (an optional
    `check(config)` in its module that raises CrossjaxError), so that a bad setting fails before training,
    not after it."""
    for name in names(spec):
        checker = getattr(importlib.import_module(f"{__name__}.{name}"), "check", None)
        if callable(checker):
            checker(config)


def available() -> list[str]:
    import pkgutil
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The evaluate function of evaluator `name`."""
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "evaluate", None)):
        raise CrossjaxError(f"crossjax/evals/{name}.py has no evaluate(run) function")
    return module.evaluate


def run_all(spec: str, run: RunContext) -> dict[str, dict]:
    """Run the evaluators named in spec on `run`; {name: result} for those that apply."""
    results = {}
    for name in names(spec):
        result = get(name)(run)
        if result is not None:
            results[name] = result
    return results
