"""The science layer on a finished run: attribute a task to the crosscoder's features at each snapshot
(crossjax.attribution), and score the features' complexity against when they form (crossjax.complexity).

    python -m crossjax.analyze --workdir=/tmp/crossjax_tiny --task=kjv_agreement
    python -m crossjax.analyze --workdir=DIR --task=my_task.jsonl --snapshots=step0,step1600 --ig_steps=64
    python -m crossjax.analyze --workdir=DIR --complexity=offline
    python -m crossjax.analyze --workdir=DIR --complexity=anthropic --complexity_model=MODEL --allow_network

--complexity scores --complexity_features emerging features from their top contexts (offline: a formula over the
contexts; openai/anthropic: an LLM over HTTP with the key from the environment, sent only with --allow_network,
after printing how many prompts go where; answers cached in DIR/complexity_cache) and prints the correlation of
emergence step and complexity; everything goes to DIR/complexity_<scorer>.json. The top contexts come from the
run's one FeatureIndex, DIR/index, shared with `python -m crossjax.report` (built by whichever runs first).

--task is a bundled task (ioi, sva, kjv_agreement, kjv_agreement_vocative, induction) or a .jsonl file of
clean/corrupted pairs (crossjax/attribution/tasks.py gives the format). It needs no --config: the run's snapshots,
hook and crosscoder are read from DIR/config.json, DIR/summary.json and DIR/export. Per snapshot it prints the
task metric (logit of the right answer minus the wrong one) on the clean and corrupted prompts, and the metric
with the top-k attributed features ablated against k random active features; everything, with the retention
curves and each method's top features, goes to DIR/attribution/<task>.json, the per-feature scores to .npz.

Each analysis also leaves its line in DIR/summary.json (evals["attribution"][<task>], evals["complexity"][<scorer>])
and its section in the next `python -m crossjax.report --workdir=DIR`. At the end of a training run the
`attribution` evaluator does the --task part (config.evals with attribution, eval.attribution_task and the
eval.attribution_* settings).
On several hosts (jax.distributed from the environment or --coordinator/--num_processes/--process_id, as for
crossjax.train) the processes share the feature index's pass for --complexity; process 0 attributes, scores and
writes. Errors (an unfinished run, a malformed task line) are one line and exit code 2, as for every crossjax command.
"""
from __future__ import annotations

import sys

from absl import flags

from crossjax import cli

FLAGS = flags.FlagValues()   # its own flags: the shared ones of crossjax/cli.py require --config
flags.DEFINE_string("workdir", None, "the finished run's workdir (holds summary.json and export/)", flag_values=FLAGS)
flags.DEFINE_string("task", None, "a bundled task name or a .jsonl file of prompt pairs", flag_values=FLAGS)
flags.DEFINE_list("snapshots", [], "snapshots to analyze (default: all of the run's)", flag_values=FLAGS)
flags.DEFINE_list("methods", ["attribution", "clean_minus_corrupted", "integrated_gradients"],
                  "attribution methods; each gets its own ablation and retention curves", flag_values=FLAGS)
flags.DEFINE_integer("ig_steps", 32, "integrated-gradients steps (midpoint rule)", flag_values=FLAGS)
flags.DEFINE_integer("draws", 3, "random feature sets averaged per k", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the random feature sets", flag_values=FLAGS)
flags.DEFINE_integer("max_k", None, "largest k of the curves (default: the number of active features)",
                     flag_values=FLAGS)
flags.DEFINE_string("complexity", "", "score feature complexity: offline, openai or anthropic", flag_values=FLAGS)
flags.DEFINE_string("complexity_model", "", "the LLM for --complexity=openai|anthropic", flag_values=FLAGS)
flags.DEFINE_string("complexity_base_url", "", "the API's base URL (default: the vendor's)", flag_values=FLAGS)
flags.DEFINE_string("complexity_key_env", "", "environment variable holding the API key (default: the vendor's)",
                    flag_values=FLAGS)
flags.DEFINE_bool("allow_network", False, "send prompts to the LLM API (nothing is sent without it)",
                  flag_values=FLAGS)
flags.DEFINE_integer("complexity_features", 64, "emerging features scored", flag_values=FLAGS)
flags.DEFINE_bool("skip_invalid_pairs", False, "leave out pairs the run's tokenizer cannot take (a multi-token "
                  "answer, prompts of different lengths) instead of stopping at the first", flag_values=FLAGS)

join_processes = cli.define_distributed_flags(FLAGS)

_USAGE = ("usage: python -m crossjax.analyze --workdir=DIR [--task=NAME_OR_FILE [--snapshots=a,b] [--methods=...] "
          "[--ig_steps=N] [--draws=N] [--max_k=N] [--skip_invalid_pairs]] [--complexity=offline|openai|anthropic "
          "[--complexity_model=M] [--allow_network]]")
SHOWN_K = (1, 4, 16, 64)


def table(out: dict) -> str:
    """The headline: per snapshot, clean/corrupted metric and the first method's ablation of top-k vs random k."""
    names = list(out["snapshots"])
    first = next(iter(out["snapshots"][names[0]]["curves"]))
    width = max(8, *(len(n) for n in names))
    ks = [k for k in SHOWN_K if any(k in s["curves"][first]["k"] for s in out["snapshots"].values())]
    head = "  ".join(f"k={k:<3} top / random" for k in ks)
    lines = [f"task {out['task']}: {out['pairs']} pairs at {out['hook']}; metric = logit(right) - logit(wrong); "
             f"ablating the top-k features by {first} against k random active features",
             f"{'snapshot':<{width}}   clean  corrupted  active  {head}"]
    for name in names:
        s = out["snapshots"][name]
        c = s["curves"][first]
        cells = []
        for k in ks:
            if k in c["k"]:
                i = c["k"].index(k)
                cells.append(f"{c['ablate_top'][i]:+7.3f} / {c['ablate_random'][i]:+7.3f}")
            else:
                cells.append(" " * 17)
        lines.append(f"{name:<{width}}  {s['metric_clean']:+6.3f}  {s['metric_corrupted']:+9.3f}  "
                     f"{s['active_features']:6d}  " + "  ".join(f"{cell:<20}" for cell in cells).rstrip())
    lines.append("written: " + "  ".join(out["files"]))
    return "\n".join(lines)


def complexity_line(out: dict) -> str:
    c = out["correlation"]
    if c.get("spearman_r") is None:
        return f"complexity ({out['scorer']}): {c.get('features', 0)} features scored; no correlation: {c.get('note')}"
    return (f"complexity ({out['scorer']}) of {c['features']} emerging features against their emergence step: "
            f"Spearman r {c['spearman_r']:+.3f} (p {c['spearman_p']:.3g}), Pearson r {c['pearson_r']:+.3f} "
            f"(p {c['pearson_p']:.3g}); scores in complexity_{out['scorer']}.json")


def main(argv: list[str]) -> int:
    """argv as sys.argv (program name first); returns the exit code."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\n" + FLAGS.get_help())
        return 0
    FLAGS.unparse_flags()    # a second call in one process starts from the defaults again
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"crossjax.analyze: error: {e}\n{_USAGE}", file=sys.stderr)
        return 2
    missing = [] if FLAGS.workdir else ["--workdir"]
    if not (FLAGS.task or FLAGS.complexity):
        missing.append("--task or --complexity")
    if len(rest) > 1 or missing:
        what = f"unexpected arguments {rest[1:]}" if len(rest) > 1 else f"{' and '.join(missing)} required"
        print(f"crossjax.analyze: error: {what}\n{_USAGE}", file=sys.stderr)
        return 2

    def body() -> None:
        join_processes()    # several hosts share the feature index's pass for --complexity
        import jax
        first = jax.process_index() == 0
        if FLAGS.task and first:   # one process attributes (no pass over the store) and writes
            from crossjax.attribution import analyze_run
            out = analyze_run(FLAGS.workdir, FLAGS.task, snapshots=FLAGS.snapshots or None, methods=FLAGS.methods,
                              ig_steps=FLAGS.ig_steps, draws=FLAGS.draws, seed=FLAGS.seed, max_k=FLAGS.max_k,
                              skip_invalid=FLAGS.skip_invalid_pairs)
            print(table(out))
        if FLAGS.complexity:
            from crossjax.complexity.run import score_run
            out = score_run(FLAGS.workdir, scorer=FLAGS.complexity, model=FLAGS.complexity_model,
                            base_url=FLAGS.complexity_base_url, key_env=FLAGS.complexity_key_env,
                            allow_network=FLAGS.allow_network, features=FLAGS.complexity_features, seed=FLAGS.seed)
            if first:
                print(complexity_line(out))

    cli.run("analyze", body)    # bad input or state: one line and exit code 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
