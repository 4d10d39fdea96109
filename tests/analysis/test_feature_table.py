"""FeatureIndex.table against the run summary it reads: clusters that reproduce the summary's sizes and mean
curves, separability where the evaluation measured it, and missing values where the run does not say."""
import numpy as np
import pandas as pd
import pytest

from crossjax import configs, crosscoder, crosscoder_export
from crossjax import workdir as workdir_lib
from crossjax.analysis import evolution
from crossjax.analysis.lookup import FeatureIndex
from crossjax.array_store import store_from_arrays
from crossjax.summary import RunSummary

NAMES = ("step0", "step4", "step16", "step64")
S, D, F, K, SEED = 4, 8, 16, 3, 7


def crosscoder_params():
    rng = np.random.default_rng(1)
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation="relu")
    w_dec = rng.normal(size=(S, F, D)) * rng.uniform(0.0, 1.0, size=(S, F, 1))
    w_dec[:, 0] = 0.0  # dead
    # feature 1 emerges at step16
    w_dec[:, 1] = np.asarray([0.01, 0.01, 1.0, 0.9])[:, None] * w_dec[3, 1] / np.linalg.norm(w_dec[3, 1])
    params = {"W_enc": rng.normal(size=(S, D, F)) * 0.3, "b_enc": np.full(F, -0.2), "W_dec": w_dec,
              "b_dec": np.zeros((S, D)), "log_threshold": np.zeros(F)}
    return {k: np.asarray(v, np.float32) for k, v in params.items()}, cfg


SEPARABILITY = {"features": [1, 4], "snapshots": list(NAMES), "auc": [[0.5, 0.6, 0.7, 0.8], [0.9, 0.8, 0.7, None]],
                "spearman": [0.8, None], "median_spearman": 0.8}


def make_run(path, store, evolution_summary, separability=SEPARABILITY):
    params, cfg = crosscoder_params()
    crosscoder_export.export_params(params, np.ones(S), cfg, str(path / "export"))
    config = configs.base_config()
    config.train.seed = SEED
    workdir_lib.record(config, str(path))
    RunSummary(workdir=str(path), store=store.url, steps=1, tokens=1, snapshots=list(NAMES), num_features=F,
               init_norm=1.0, scales=[1.0] * S, export=str(path / "export"), evolution=evolution_summary,
               evals={"separability": separability} if separability else {}).write(str(path))
    return path, params


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x = np.random.default_rng(0).normal(size=(400, S, D)).astype(np.float32)
    return store_from_arrays(x, url=str(tmp_path_factory.mktemp("table") / "store"), block_rows=128, snapshots=NAMES)


def test_table_columns_follow_the_index_and_the_summary(store, tmp_path):
    params, _ = crosscoder_params()
    summary = evolution.summarise(params["W_dec"], list(NAMES), clusters=K, cluster_seed=SEED)
    work, _ = make_run(tmp_path, store, summary)
    index = FeatureIndex.build(work, top_k=2, progress=False)
    table = index.table()
    assert isinstance(table, pd.DataFrame) and len(table) == F and table.index.name == "feature"
    assert list(table.columns) == ["kind", "emergence", "emergence_step", "cluster", "frequency", "mean_activation",
                                   "separability_auc", "separability_spearman"]
    assert table["kind"].tolist() == index.kinds.tolist() and table.loc[0, "kind"] == "dead"
    assert pd.isna(table.loc[0, "emergence"]) and pd.isna(table.loc[0, "emergence_step"])
    assert table.loc[1, "emergence"] == "step16" and table.loc[1, "emergence_step"] == 16
    steps = {n: int(n[4:]) for n in NAMES}
    for f in range(1, F):
        assert table.loc[f, "emergence_step"] == steps[table.loc[f, "emergence"]]
    np.testing.assert_array_equal(table["frequency"], index.frequency)
    np.testing.assert_array_equal(table["mean_activation"], index.mean_activation)
    # the clusters are the summary's: the same sizes, the same mean strength curves
    clusters = summary["clusters"]
    assert table.loc[0, "cluster"] == -1
    live = table[table["cluster"] >= 0]
    assert live.groupby("cluster").size().tolist() == clusters["sizes"]
    strength = evolution.normalised_strength(index.norms)
    for c, curve in enumerate(clusters["mean_curves"]):
        np.testing.assert_allclose(strength[:, live.index[live["cluster"] == c]].mean(axis=1), curve, atol=1e-6)
    # separability where it was measured (null AUC and rho read back as NaN)
    assert table.loc[1, "separability_auc"] == 0.8 and table.loc[1, "separability_spearman"] == 0.8
    assert table.loc[[4], ["separability_auc", "separability_spearman"]].isna().all(axis=None)
    assert table.drop(index=[1, 4])[["separability_auc", "separability_spearman"]].isna().all(axis=None)
    # the saved index reads the same run
    assert FeatureIndex.load(index.save(tmp_path / "index")).table().equals(table)


def test_table_without_what_the_run_does_not_say(store, tmp_path, capsys):
    params, _ = crosscoder_params()
    # a summary whose clusters came from other weights: the table says so
    other = evolution.summarise(params["W_dec"][::-1].copy(), list(NAMES), clusters=K, cluster_seed=SEED)
    work, _ = make_run(tmp_path / "a", store, other, separability=None)
    sizes = evolution.summarise(params["W_dec"], list(NAMES), clusters=K, cluster_seed=SEED)["clusters"]["sizes"]
    assert sizes != other["clusters"]["sizes"]
    table = FeatureIndex.build(work, top_k=2, progress=False).table()
    assert "the summary was written for other weights" in capsys.readouterr().err
    assert table["separability_auc"].isna().all()
    # no clusters in the summary, and an index built from an export directory alone: missing values
    work, _ = make_run(tmp_path / "b", store, {})
    assert FeatureIndex.build(work, top_k=2, progress=False).table()["cluster"].isna().all()
    import shutil
    alone = shutil.copytree(work / "export", tmp_path / "alone")
    bare = FeatureIndex.build(alone, store.url, top_k=2, progress=False).table()
    assert bare["cluster"].isna().all() and bare["separability_auc"].isna().all()
    assert bare["kind"].tolist() == table["kind"].tolist()
    # pointed at the run explicitly, it reads it
    assert FeatureIndex.build(alone, store.url, top_k=2, progress=False).table(work).loc[1, "separability_auc"] == 0.8
