"""Task attribution at the end of a run (model snapshots, eval.attribution_task set; crossjax/attribution/): the
task's metric at every trained snapshot with the crosscoder spliced in, each feature's attribution by each of
eval.attribution_methods, and the ablation/retention curves of the top-k features against k random active ones
(k over the log grid up to eval.attribution_max_k, eval.attribution_draws random sets, seeded by train.seed).

Writes what `python -m crossjax.analyze --task=...` writes (workdir/attribution/<task>.{json,npz}) and returns
the same summary line: {<task>: attribution.run.summary_entry(...)}, stored as evals["attribution"].
`check(config)` finds a bad method or an unreadable task before any stage runs (evals.check).
"""
from __future__ import annotations

import os

from crossjax import console
from crossjax.errors import CrossjaxError


def check(config) -> None:
    """Before any stage runs: the methods are known and the task loads (a bundled name or a readable .jsonl file;
    its lines are tokenized only once the model is there). CrossjaxError naming the key to fix."""
    task = str(config.eval.attribution_task)
    if config.data.source != "snapshots" or not task:
        return
    from crossjax.attribution import attribute, tasks
    methods = [m.strip() for m in str(config.eval.attribution_methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in attribute.METHODS]
    if unknown or not methods:
        raise CrossjaxError(f"eval.attribution_methods={config.eval.attribution_methods!r} names "
                            f"{unknown or 'no method'}; choose among {', '.join(attribute.METHODS)}, e.g. "
                            "--config.eval.attribution_methods=attribution")
    if int(config.eval.attribution_ig_steps) < 1 or int(config.eval.attribution_draws) < 1 \
            or int(config.eval.attribution_max_k) < 0:
        raise CrossjaxError("eval.attribution_ig_steps and eval.attribution_draws must be >= 1 and "
                            "eval.attribution_max_k >= 0 (0: every active feature)")
    if task not in tasks.GENERATED:
        try:
            tasks.load_task(task)
        except CrossjaxError as e:
            raise CrossjaxError(f"eval.attribution_task={task!r}: {e}") from None


def evaluate(run) -> dict | None:
    config = run.config
    task = str(config.eval.attribution_task)
    if config.data.source != "snapshots" or not task:
        return None
    check(config)
    import jax
    if jax.process_index() != 0 or run.export_dir is None:    # the export is written by process 0
        return None
    from crossjax import activations
    from crossjax.attribution import run as run_lib

    methods = [m.strip() for m in str(config.eval.attribution_methods).split(",") if m.strip()]
    names = list(run.snapshots)
    dirs = {n: str(d) for n, d in activations.snapshot_dirs(config.model, names).items()}
    hook = str(config.model.hook)
    try:
        tokenized = run_lib.tokenized_task(task, dirs[names[0]],
                                           skip_invalid=bool(config.eval.attribution_skip_invalid))
    except CrossjaxError as e:       # the run is trained and exported: the same command evaluates it again
        raise CrossjaxError(f"eval.attribution_task={task!r}: {e} (or leave such pairs out with "
                            "--config.eval.attribution_skip_invalid=True, or pick a task of this model's words: "
                            "induction fits any model; the same command then evaluates the finished run)") from None
    console.say("attribution", f"task {tokenized.name} at {len(names)} snapshots, methods {', '.join(methods)}")
    ig_steps, draws, seed = int(config.eval.attribution_ig_steps), int(config.eval.attribution_draws), \
        int(config.train.seed)
    results = run_lib.analyze(dirs, run.export_dir, hook, tokenized, methods=methods, ig_steps=ig_steps,
                              draws=draws, seed=seed, max_k=int(config.eval.attribution_max_k) or None)
    out = run_lib.write_results(os.path.abspath(run.workdir), tokenized, hook, results, export=run.export_dir,
                                ig_steps=ig_steps, draws=draws, seed=seed)
    return {tokenized.name: run_lib.summary_entry(out)}
