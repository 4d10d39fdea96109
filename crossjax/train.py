"""Train a crosscoder from the command line (the work is in crossjax.pipeline.run).

    python -m crossjax.train --config=experiments/synthetic.py:quick --workdir=/tmp/xj
    python -m crossjax.train --config=experiments/synthetic.py:quick --config.train.lr=1e-3 --workdir=/tmp/xj2

Missing stages (offline suite, activations, planted store) run first; the same command again resumes from the
latest checkpoint. Multi-host: add --distributed (cluster auto-detection), or on one machine
--distributed --coordinator=127.0.0.1:PORT --num_processes=N --process_id=I.
"""
from __future__ import annotations

from crossjax import cli


def train() -> None:
    import jax

    from crossjax import pipeline
    summary = pipeline.run(cli.CONFIG.value, cli.WORKDIR.value)
    if jax.process_index() == 0:
        print(report(summary))
    if cli.CONFIG.value.eval.report:   # on every process: they share the feature index's pass; process 0 writes
        from crossjax.report import write_report
        path = write_report(summary.workdir)
        if jax.process_index() == 0:
            print(f"report: {path} (open it in a browser: file://{path})")


def report(summary) -> str:
    """The headline of a finished run (a RunSummary): held-out EV, recovery or spliced loss and L0 per snapshot,
    the feature kinds and when the features form, and where the files are."""
    heldout = summary.heldout
    ev = heldout.get("ev_mean")
    lines = [f"done: {summary.steps} steps, {summary.tokens} tokens" + (f", held-out EV {ev:.4f}" if ev is not None
                                                                         else "")]
    r = summary.evals.get("recovery")
    if r is not None:
        lines.append(f"planted recovery: mean max cosine {r['mean_max_cos']:.3f}, "
                     f"fraction above {r['threshold']}: {r['frac_above']:.3f}")
        if "emergence_accuracy" in r:
            lines.append(f"emergence snapshot of the {r['num_emergent']} emergent features: exact "
                         f"{r['emergence_accuracy']:.2f}, within one {r['emergence_within_one']:.2f}")
    names = summary.snapshots
    width = max(len(n) for n in names)
    if heldout.get("ev") is not None and heldout.get("l0") is not None:
        lines.append(f"{'snapshot':<{width}}  held-out EV     L0")
        lines += [f"{name:<{width}}  {e:11.4f}  {n:5.1f}" for name, e, n in zip(names, heldout["ev"], heldout["l0"])]
    spliced = summary.evals.get("spliced")
    if spliced:
        lines.append(f"{'snapshot':<{width}}  clean loss  spliced loss  zero-ablated  loss recovered")
        for name in names:
            x = spliced[name]
            lines.append(f"{name:<{width}}  {x['clean_loss']:10.4f}  {x['spliced_loss']:12.4f}  "
                         f"{x['zero_ablated_loss']:12.4f}  {x['loss_recovered']:14.3f}")
    sep = summary.evals.get("separability")
    if sep and sep.get("median_spearman") is not None:
        lines.append(f"separability: median Spearman rho between probe AUC and decoder norm over snapshots "
                     f"{sep['median_spearman']:+.3f} for {len(sep['features'])} features "
                     f"({100 * sep['fraction_positive']:.0f}% positive)")
    phases = summary.evals.get("phases")
    if phases:
        t = phases["transition"]
        lines.append(f"two phases: the model is closest to the corpus bigram statistics at {t['snapshot']} "
                     f"(to the unigram statistics at {t['closest_to_unigram']})")
    for task, a in summary.evals.get("attribution", {}).items():
        items = list(a["snapshots"].items())
        first, last = items[0], items[-1]
        x = last[1]
        line = (f"attribution {task}: metric {first[1]['metric_clean']:+.2f} at {first[0]} -> "
                f"{x['metric_clean']:+.2f} at {last[0]}")
        if x.get("k") is not None:
            line += (f"; top-{x['k']} features ({a['method']}) ablated {x['ablate_top']:+.2f}, {x['k']} random "
                     f"{x['ablate_random']:+.2f}")
        lines.append(line)
    for scorer, c in summary.evals.get("complexity", {}).items():
        lines.append(f"complexity ({scorer}) against emergence step: Spearman r {c['spearman_r']:+.3f} "
                     f"(p {c['spearman_p']:.3g}, n {c['features']})" if c.get("spearman_r") is not None else
                     f"complexity ({scorer}): no correlation ({c.get('note')})")
    evolution = summary.evolution
    if evolution:
        kinds = ", ".join(f"{k} {v}" for k, v in evolution["kinds"].items() if v)
        lines.append(f"features by kind: {kinds}")
        emerged = ", ".join(f"{k}: {v}" for k, v in evolution["emergent_features_by_snapshot"].items() if v)
        lines.append(f"emergent features by the snapshot where their decoder norm first reaches "
                     f"{evolution['emergence_threshold']:g} of its peak: {emerged or 'none'}")
    w = summary.workdir
    lines.append(f"summary: {w}/summary.json  metrics: {w}/metrics.jsonl  tensorboard: {w}/tb  "
                 f"weights: {summary.export}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.main("train", train)
