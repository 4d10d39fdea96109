"""On the tiny suite's finished run: the KJV agreement task's metric rises over the snapshots, and per snapshot
ablating the top-k attributed features lowers it far more than ablating k random active features.

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


def test_kjv_agreement_rises_and_its_top_features_carry_it():
    assert (RUN / "summary.json").is_file(), (
        f"no finished tiny run at {RUN}: run python -m crossjax.train --config=experiments/tiny.py "
        "--workdir=runs/tiny first, or set CROSSJAX_TINY_RUN to a finished one")
    names, dirs, hook, export = run.run_snapshots(str(RUN))
    tokenizer = tokens.load_tokenizer(dirs[names[0]])
    task = tasks.tokenize(tasks.load_task("kjv_agreement"), tokenizer)
    out = run.analyze(dirs, export, hook, task, methods=["attribution"], draws=3, max_k=K)
    metric = np.array([out[n]["attribution"].metric_clean for n in names])
    assert metric[-1] > metric[0] + 2.0 and spearmanr(np.arange(len(names)), metric)[0] > 0.9
    learned = 0
    for name in names:
        c = out[name]["curves"]["attribution"]
        m = out[name]["attribution"].metric_clean
        i = c["k"].index(K)
        drop_top, drop_random = m - c["ablate_top"][i], m - c["ablate_random"][i]
        print(f"{name}: metric {m:+.3f}  ablate top-{K} {c['ablate_top'][i]:+.3f}  random {K} "
              f"{c['ablate_random'][i]:+.3f}")
        assert drop_top > drop_random          # at every snapshot, learned or not
        if m > 1.0:                            # where the task is learned: the top features carry most of it
            learned += 1
            assert drop_top > 0.5 * m and drop_top > drop_random + 0.4 * m
    assert learned >= len(names) // 2
