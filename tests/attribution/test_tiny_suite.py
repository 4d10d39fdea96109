"""On the tiny suite's finished run: the KJV agreement tasks' metric rises over the snapshots (the plain one from
step128, the vocative one from step400), and per snapshot ablating the top-k attributed features lowers it far
more than ablating k random active features.

At a residual hook the whole task passes through the crosscoder, so where it is learned the top features carry
most of the metric. At an attention output (the default) only the part that flows through that sublayer does:
there the measure is what patching the corrupted prompts' activation in at the hook removes, and the top features
must carry a good share of that.

Needs a finished run of experiments/tiny.py (python -m crossjax.train --config=experiments/tiny.py
--workdir=runs/tiny, about ten minutes); CROSSJAX_TINY_RUN names another workdir. Slow: pytest -m slow.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from crossjax import tokens
from crossjax.attribution import run, tasks

RUN = Path(os.environ.get("CROSSJAX_TINY_RUN", Path(__file__).resolve().parents[2] / "runs" / "tiny"))
K = 16

pytestmark = pytest.mark.slow


# task -> (its rise from the first to the last snapshot, the Spearman of the metric against training order, the
# metric where it counts as learned, how many snapshots must have learned it)
TASKS = {"kjv_agreement": (2.0, 0.9, 1.0, 6), "kjv_agreement_vocative": (1.0, 0.7, 0.3, 3)}


@pytest.mark.parametrize("task_name", list(TASKS))
def test_kjv_agreement_rises_and_its_top_features_carry_it(task_name):
    rise, rho, learned_at, learned_snapshots = TASKS[task_name]
    assert (RUN / "summary.json").is_file(), (
        f"no finished tiny run at {RUN}: run python -m crossjax.train --config=experiments/tiny.py "
        "--workdir=runs/tiny first, or set CROSSJAX_TINY_RUN to a finished one")
    names, dirs, hook, export = run.run_snapshots(str(RUN))
    residual = "resid" in hook.rsplit(".", 1)[-1]
    tokenizer = tokens.load_tokenizer(dirs[names[0]])
    task = tasks.tokenize(tasks.load_task(task_name), tokenizer)
    out = run.analyze(dirs, export, hook, task, methods=["attribution"], draws=3, max_k=K)
    metric = np.array([out[n]["attribution"].metric_clean for n in names])
    assert metric[-1] > metric[0] + rise and spearmanr(np.arange(len(names)), metric)[0] > rho
    learned = 0
    for name in names:
        c = out[name]["curves"]["attribution"]
        m = out[name]["attribution"].metric_clean
        i = c["k"].index(K)
        drop_top, drop_random = m - c["ablate_top"][i], m - c["ablate_random"][i]
        print(f"{name}: metric {m:+.3f}  ablate top-{K} {c['ablate_top'][i]:+.3f}  random {K} "
              f"{c['ablate_random'][i]:+.3f}")
        assert drop_top > drop_random          # at every snapshot, learned or not
        if m > learned_at and residual:        # where the task is learned: the top features carry most of it
            assert drop_top > 0.5 * m and drop_top > drop_random + 0.4 * m
        elif m > learned_at:                   # ... or a good share of what passes through the hook
            through_hook = m - out[name]["attribution"].metric_corrupted
            assert drop_top > 0.25 * through_hook and drop_top > drop_random + 0.2 * through_hook
        learned += m > learned_at
    assert learned >= learned_snapshots
