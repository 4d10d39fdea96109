"""Training on a subset of the store's snapshots (data.snapshots) and crossjax.compare: per-snapshot SAEs beside
the crosscoder, on the same store, with the same code."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from _procs import child_env
from _files import tree_bytes
from _trainer_util import ROOT, experiment
from crossjax import compare, config_checks, crosscoder, data, metrics, pipeline, planted, snapshot_names
from crossjax import crosscoder_export
from crossjax.analysis import recovery
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore
from crossjax.summary import RunSummary


def _tiny():
    return experiment("synthetic", "tiny")


def test_compare_matches_the_crosscoder_and_direct_sae_runs(tmp_path):
    c = _tiny()
    work = tmp_path / "run"
    pipeline.run(c, str(work))
    store_before = tree_bytes(work / "store")
    result = compare.compare(c, str(work), ["planted_1", "planted_3"])
    cc = RunSummary.read(work)

    # the crosscoder's figures are its summary's, snapshot by snapshot, in the result, compare.json and the table
    assert result["snapshots"] == ["planted_1", "planted_3"]
    assert result["crosscoder"]["ev"] == [cc.heldout["ev"][1], cc.heldout["ev"][3]]
    assert result["crosscoder"]["l0"] == [cc.heldout["l0"][1], cc.heldout["l0"][3]]
    per = cc.evals["recovery"]["mean_max_cos_per_snapshot"]
    assert result["crosscoder"]["max_cos"] == [per[1], per[3]]
    assert json.loads((work / "compare.json").read_text()) == result
    text = compare.table(result)
    assert (f"| planted_3 | {cc.heldout['ev'][3]:.4f} | {result['sae']['ev'][1]:.4f} | "
            f"{cc.heldout['l0'][3]:.1f} | {result['sae']['l0'][1]:.1f} |") in text
    assert "| snapshot | crosscoder max cos | SAE max cos |" in text

    # every SAE is an S=1 run on the crosscoder's store: no store of its own, the store untouched
    assert tree_bytes(work / "store") == store_before
    store = ActivationStore.open(cc.store)
    for s, name, sae_dir in zip((1, 3), result["snapshots"], result["sae_workdirs"]):
        assert sae_dir == str(work / "sae" / name)
        assert not os.path.exists(os.path.join(sae_dir, "store"))
        summary = RunSummary.read(sae_dir)
        assert summary.store == cc.store and summary.snapshots == [name]
        assert summary.steps == cc.steps and summary.tokens == cc.tokens
        assert summary.num_features == cc.num_features
        assert summary.scales == pytest.approx([float(store.scales[s])], rel=1e-6)
        assert summary.evals["recovery"]["snapshots"] == [s] and "emergence_accuracy" not in summary.evals["recovery"]
        _, scales, cfg = crosscoder_export.load_exported(summary.export)
        assert cfg.num_snapshots == 1 and scales.shape == (1,)

    # second code path: the same SAE trained by pipeline.run with data.snapshots set by hand
    direct_cfg = _tiny()
    direct_cfg.store.path = str(work / "store")
    direct_cfg.data.snapshots = "planted_3"
    direct = pipeline.run(direct_cfg, str(tmp_path / "direct"))
    assert direct.heldout["ev"] == pytest.approx([result["sae"]["ev"][1]], rel=1e-6)
    assert direct.heldout["l0"] == pytest.approx([result["sae"]["l0"][1]], rel=1e-6)
    assert direct.evals["recovery"]["mean_max_cos"] == pytest.approx(result["sae"]["max_cos"][1], rel=1e-6)
    via_compare, _, _ = crosscoder_export.load_exported(result["sae_workdirs"][1] + "/export")
    by_hand, _, _ = crosscoder_export.load_exported(direct.export)
    for k in via_compare:
        np.testing.assert_allclose(by_hand[k], via_compare[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert tree_bytes(work / "store") == store_before

    with pytest.raises(CrossjaxError, match="was trained on"):
        compare.compare(c, str(work), ["step7"])


def test_snapshot_selection_by_name_or_index():
    names = ("a", "b", "c")
    assert snapshot_names.select("", names) == (names, None)
    assert snapshot_names.select("c", names) == (("c",), [2])
    assert snapshot_names.select(" c , 0", names) == (("c", "a"), [2, 0])
    assert snapshot_names.select("-1", names) == (("c",), [2])
    assert snapshot_names.select("a,b,c", names) == (names, None)   # all, in store order: nothing to select
    with pytest.raises(CrossjaxError, match=r"unknown: \['d', '3'\]"):
        snapshot_names.select("d,3", names)
    with pytest.raises(CrossjaxError, match="listed twice"):
        snapshot_names.select("c,2", names)

    c = _tiny()
    c.data.snapshots = "planted_1,nope"
    with pytest.raises(CrossjaxError, match=r"unknown: \['nope'\]"):
        config_checks.validate(c)    # before any store is written
    c.data.snapshots = "planted_2"
    assert config_checks.num_snapshots(c) == 1
    c.mesh.data, c.mesh.snapshot = 4, 2
    with pytest.raises(CrossjaxError, match="not divisible by the mesh snapshot axis"):
        config_checks.validate(c)    # one snapshot cannot be split over a 2-way snapshot axis
    sae = compare.sae_config(c, "/somewhere/store", "planted_2")
    assert (sae.mesh.data, sae.mesh.snapshot) == (8, 1) and sae.store.path == "/somewhere/store"
    config_checks.validate(sae)


def test_a_snapshot_subset_delivers_exactly_those_columns(tmp_path):
    c = _tiny()
    pipeline.run(c, str(tmp_path))  # writes the planted store
    store = ActivationStore.open(str(tmp_path / "store"))
    full = data.make_loader(store, global_batch=64, seed=3, sharding=None, num_epochs=1)
    sub = data.make_loader(store, global_batch=64, seed=3, sharding=None, num_epochs=1, snapshots=[3, 1])
    for a, b in zip(full, sub):
        np.testing.assert_array_equal(b["acts"], a["acts"][:, [3, 1]])
    full.close(), sub.close()
    with pytest.raises(CrossjaxError, match="distinct indices"):
        data.make_loader(store, global_batch=64, seed=3, sharding=None, snapshots=[4])


@pytest.mark.slow   # about 17 s; compare itself (above) trains and evaluates one-snapshot runs
def test_a_subset_run_trains_and_evaluates_on_exactly_that_column(tmp_path):
    """Store snapshots planted_0..3, data.snapshots="2": the run sees column 2 only."""
    c = _tiny()
    c.store.path = str(tmp_path / "store")
    pipeline.run(c, str(tmp_path / "all"))  # the store and its scales
    store = ActivationStore.open(c.store.path)
    c.data.snapshots = "2"
    c.crosscoder.init_norm = -1.0  # grid search on the first training batch: a fingerprint of the data trained on
    summary = pipeline.run(c, str(tmp_path / "sub"))
    assert summary.snapshots == ["planted_2"]
    assert summary.scales == pytest.approx([float(store.scales[2])], rel=1e-6)
    params, scales, cfg = crosscoder_export.load_exported(summary.export)
    assert cfg.num_snapshots == 1 and params["W_dec"].shape[0] == 1
    records = [json.loads(line) for line in open(tmp_path / "sub" / "metrics.jsonl")]
    assert all(len(r["ev"]) == 1 for r in records)

    # training: the first batch of the full loader (same seed and blocks), column by column, through the grid search
    train_blocks, _ = pipeline.split_blocks(c, store)
    loader = data.make_loader(store, global_batch=int(c.train.batch_size), seed=int(c.train.seed), sharding=None,
                              blocks=list(train_blocks), window_blocks=int(c.data.window_blocks))
    first = np.asarray(next(loader)["acts"], np.float32)
    loader.close()
    key = jax.random.key(int(c.train.seed))
    norms = [crosscoder.grid_search_init_norm(key, cfg, crosscoder.normalize(first[:, [s]], store.scales[[s]]))
             for s in range(4)]
    assert summary.init_norm == pytest.approx(norms[2], rel=1e-5)
    assert sum(abs(n - summary.init_norm) < 1e-6 for n in norms) == 1, norms  # the columns are told apart

    # evaluation: the held-out block's column 2 through the exported SAE, with the one-shot formula
    start, stop = store.block_range(store.meta.num_blocks - 1)
    held = store.read_rows(start, stop).astype(np.float32) * store.scales[None, :, None]
    ev = [float(metrics.explained_variance(held[:, [s]],
                                           crosscoder.forward(params, held[:, [s]], cfg)["xhat"])[0])
          for s in range(4)]
    assert summary.heldout["ev"][0] == pytest.approx(ev[2], abs=1e-4)
    assert min(abs(ev[s] - ev[2]) for s in (0, 1, 3)) > 1e-3, ev

    # planted recovery with the truth of snapshot 2 (presence judged against each feature's peak over all four)
    rec = summary.evals["recovery"]
    assert rec["snapshots"] == [2] and "note" in rec and "emergence_accuracy" not in rec
    tiled = recovery.planted_recovery(np.repeat(params["W_dec"], 4, axis=0), planted.load_truth(store.url),
                                     threshold=rec["threshold"], presence=rec["presence"])
    assert rec["mean_max_cos_per_snapshot"] == pytest.approx([tiled["mean_max_cos_per_snapshot"][2]], rel=1e-9)


@pytest.mark.slow   # two command-line runs (about 7 s); the numbers are checked by the tests above
def test_command_prints_the_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "crossjax.compare", f"--config={ROOT}/experiments/synthetic.py:tiny",
         f"--workdir={tmp_path}", "--snapshots=planted_0", "--config.train.steps=4"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=child_env(1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cc = RunSummary.read(tmp_path)
    sae = RunSummary.read(tmp_path / "sae" / "planted_0")
    assert cc.steps == sae.steps == 4  # the override reaches both runs
    assert "| snapshot | crosscoder EV | SAE EV | crosscoder L0 | SAE L0 |" in proc.stdout
    assert (f"| planted_0 | {cc.heldout['ev'][0]:.4f} | {sae.heldout['ev'][0]:.4f} | {cc.heldout['l0'][0]:.1f} | "
            f"{sae.heldout['l0'][0]:.1f} |") in proc.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "crossjax.compare", f"--config={ROOT}/experiments/synthetic.py:tiny",
         f"--workdir={tmp_path}", "--config.train.stpes=4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=child_env(1))
    assert bad.returncode == 2 and "unknown config key config.train.stpes" in bad.stderr, bad.stderr[-2000:]


def test_feature_index_on_a_per_snapshot_sae(tmp_path):
    """A run on a snapshot subset reads only its columns of the store when features are looked up."""
    import jax.numpy as jnp
    from crossjax.analysis import FeatureIndex
    c = experiment("synthetic", "tiny")
    c.data.snapshots = "planted_2"
    out = pipeline.run(c, str(tmp_path))
    index = FeatureIndex.build(str(tmp_path), progress=False)
    assert index.snapshots == ("planted_2",)
    # brute force on column 2 of every row
    params, scales, cfg = crosscoder_export.load_exported(out.export)
    store = ActivationStore.open(out.store)
    x = crosscoder.normalize(jnp.asarray(store.read_rows(0, store.meta.num_rows)[:, [2]], jnp.float32),
                             jnp.asarray(scales))
    acts = np.asarray(crosscoder.forward({k: jnp.asarray(v) for k, v in params.items()}, x, cfg)["acts"])
    active = acts.reshape(acts.shape[0], -1, cfg.num_features).max(axis=1) > 0
    np.testing.assert_array_equal(index.counts, active.sum(axis=0))
    row = int(np.flatnonzero(active.any(axis=1))[0])
    assert {f for f, _ in index.features_for_row(row, k=cfg.num_features)} == set(np.flatnonzero(active[row]))
