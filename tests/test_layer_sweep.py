"""crossjax.layer_sweep on the micro suite (2 layers): one pipeline run per layer, reused when finished."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from crossjax import configs, crosscoder_export, layer_sweep
from crossjax import store as store_lib
from crossjax.analysis import evolution
from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary

REPO = Path(__file__).resolve().parents[1]


def _micro():
    config = configs.load_experiment(f"{REPO}/experiments/tiny.py:micro")
    config.tokens.num_tokens = 2048      # 4 blocks of 512, the last held out
    config.train.steps = 10
    config.train.checkpoint_every = 10
    config.train.log_every = 5
    config.evals = "heldout"
    return config


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sweep"))
    return workdir, layer_sweep.sweep(_micro(), workdir, [0, 1])


@pytest.mark.slow   # the sweep trains the micro suite at two hooks (about 20 s)
def test_each_layer_is_a_run_at_its_hook(swept):
    workdir, rows = swept
    assert [r["layer"] for r in rows] == [0, 1]
    written = json.loads(Path(workdir, layer_sweep.SWEEP_FILE).read_text())["layers"]
    assert [r["hook"] for r in written] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    first = []
    for layer, row in zip((0, 1), rows):
        summary = RunSummary.read(os.path.join(workdir, f"layer{layer}"))
        store = store_lib.ActivationStore.open(summary.store)
        assert store.meta.hook == f"blocks.{layer}.hook_resid_post"
        first.append(store.read_rows(0, 64))
        # the row's figures are those of the layer's own run and export
        assert row["kinds"] == summary.evolution["kinds"] and row["heldout_ev"] == summary.heldout["ev_mean"]
        params, scales, _ = crosscoder_export.load_exported(summary.export)
        raw = evolution.classify_kinds(evolution.raw_unit_norms(evolution.decoder_norms(params["W_dec"]), scales))
        assert row["raw_units"]["kinds_raw"] == {k: int(np.sum(raw == k)) for k in evolution.KINDS}
        assert sum(row["kinds"].values()) == summary.num_features
        assert row["token_share_rows"]["rows"] == 512            # the one held-out block of the micro store
        share = row["token_share_at_peak_median"]["all"]
        assert share is None or -0.1 < share <= 1.0
    assert not np.array_equal(first[0], first[1])               # two hooks, two different activations
    assert "layer 0:" in layer_sweep.table(rows) and "layer 1:" in layer_sweep.table(rows)


@pytest.mark.slow
def test_a_finished_layer_is_reused_and_another_config_refused(swept):
    workdir, rows = swept
    layer1 = Path(workdir, "layer1")
    before = {p: p.stat().st_mtime_ns for p in (layer1 / "summary.json", layer1 / "metrics.jsonl")}
    again = layer_sweep.sweep(_micro(), workdir, [1])
    assert again[0]["kinds"] == rows[1]["kinds"] and again[0]["token_share_at_peak_median"] == \
        rows[1]["token_share_at_peak_median"]
    assert {p: p.stat().st_mtime_ns for p in before} == before   # nothing trained or evaluated again
    other = _micro()
    other.train.steps = 12
    with pytest.raises(CrossjaxError, match=r"layer1 holds a run of another config"):
        layer_sweep.sweep(other, workdir, [1])
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_bad_layers_and_hooks_are_named(tmp_path):
    for bad in ("blocks.1.hook_resid_post", "blocks.{layer}.hook_{kind}"):
        with pytest.raises(CrossjaxError, match=r"must name each layer's hook with \{layer\}"):
            layer_sweep.sweep(_micro(), str(tmp_path), [0], bad)
    with pytest.raises(CrossjaxError, match=r"asks for layer 2 but the suite's model has 2 layers"):
        layer_sweep.sweep(_micro(), str(tmp_path), [0, 2])   # checked before layer 0 is trained
    assert list(tmp_path.iterdir()) == []
    assert layer_sweep.parse_layers(["0", "2"]) == [0, 2]
    for bad in (["a"], ["1", "1"], ["-1"], []):
        with pytest.raises(CrossjaxError, match="--layers="):
            layer_sweep.parse_layers(bad)
