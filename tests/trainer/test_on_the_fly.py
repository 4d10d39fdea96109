"""Training on activations computed on the fly (data.on_the_fly, crossjax/live_store.py) against training on the
written store: the same rows, the same batches, the same numbers; resumable; only the held-out blocks on disk.

The reference is the stored path itself: the activation stage writes a full store, and the trainer reads it.
"""
from pathlib import Path

import jax
import numpy as np
import pytest

import _activations_fixtures as fx
from _trainer_util import exported, train_records
from crossjax import config_checks, configs, pipeline, plan
from crossjax import store as store_lib
from crossjax.errors import CrossjaxError


def _config(root: Path, store: Path, **overrides):
    """3 tiny snapshots over 300 tokens: 10 blocks of 32 rows in groups of 2 blocks, 2 of them held out."""
    c = fx.make_config(root, store)
    c.data.source = "snapshots"
    c.data.d_model = 32
    c.data.window_blocks = 2
    c.crosscoder.num_features = 64
    c.crosscoder.init_norm = -1.0            # grid search on the first batch: it reads a batch too
    t = c.train
    t.batch_size, t.steps, t.lr, t.warmup_steps = 32, 12, 1e-3, 2   # 256 training rows: 8 steps an epoch
    t.log_every, t.checkpoint_every, t.heldout_blocks, t.progress = 1, 4, 2, False
    t.compute_dtype = "float32"
    c.evals = "heldout,separability"
    c.eval.separability_features, c.eval.separability_rows = 4, 64
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.make_root(tmp_path_factory.mktemp("otf") / "snaps")


@pytest.fixture(scope="module")
def stored_run(root, tmp_path_factory):
    """The reference: the full store written by the activation stage, then training on it."""
    base = tmp_path_factory.mktemp("stored")
    out = pipeline.run(_config(root, base / "store"), str(base / "run"))
    return base, out


@pytest.fixture(scope="module")
def live_run(root, tmp_path_factory):
    base = tmp_path_factory.mktemp("live")
    out = pipeline.run(_config(root, base / "store", **{"data.on_the_fly": True}), str(base / "run"))
    return base, out


def _activation_chunks(store_dir: Path) -> set[str]:
    return {str(p.relative_to(store_dir / "activations")) for p in (store_dir / "activations").rglob("*")
            if p.is_file() and p.name != "zarr.json"}


def test_on_the_fly_rows_are_the_rows_the_activation_stage_writes(root, stored_run, live_run):
    from crossjax import activations, live_store
    stored = store_lib.ActivationStore.open(str(stored_run[0] / "store"))
    config = pipeline.bind_suite(_config(root, live_run[0] / "store", **{"data.on_the_fly": True}))
    live = live_store.open_live(activations.prepare_store(config, None), config, stored_tail_blocks=2)
    assert live.live_blocks == set(range(8)) and isinstance(live, store_lib.ActivationStore)
    # a window mixing live blocks of several groups, a stored block and the short last block, in any order
    blocks = [5, 0, 9, 3, 8]
    want = stored.read_blocks(blocks)
    got = live.read_blocks(blocks)
    assert got.dtype == want.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(live.read_rows(40, 100), live.read_blocks([1, 2, 3])[8:68])
    # a sequential reader whose reads straddle blocks (the FeatureIndex's pass) computes each block once
    computed, compute = [], live._compute
    live._compute = lambda bs: computed.extend(bs) or compute(bs)
    parts = [live.read_rows(a, min(a + 20, 300)) for a in range(0, 300, 20)]
    np.testing.assert_allclose(np.concatenate(parts).astype(np.float32), stored.read_rows(0, 300).astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    assert computed == list(range(8))
    np.testing.assert_allclose(live.estimate_scales(100), stored.estimate_scales(100), rtol=1e-4)


def test_on_the_fly_training_matches_training_from_the_store(stored_run, live_run):
    (sbase, sout), (lbase, lout) = stored_run, live_run
    # per-step loss, EV, L0 ... as metrics.jsonl records them
    srec, lrec = train_records(sbase / "run"), train_records(lbase / "run")
    assert [r["step"] for r in lrec] == [r["step"] for r in srec] == list(range(1, 13))
    for a, b in zip(srec, lrec):
        for key in ("loss", "mse", "l0", "ev", "sparsity", "dead_frac"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-5, err_msg=f"step {a['step']} {key}")
    # final parameters, scales, held-out evaluation
    ws, wl = exported(sbase / "run"), exported(lbase / "run")
    assert sorted(ws) == sorted(wl)
    for k in ws:
        np.testing.assert_allclose(wl[k], ws[k], rtol=2e-3, atol=2e-5, err_msg=k)
    np.testing.assert_allclose(lout.scales, sout.scales, rtol=1e-4)
    assert lout.init_norm == pytest.approx(sout.init_norm, rel=1e-5)
    assert lout.heldout["rows"] == sout.heldout["rows"] == 44
    np.testing.assert_allclose(lout.heldout["ev"], sout.heldout["ev"], rtol=2e-3)
    assert list(lout.evals) == ["heldout", "separability"]


def test_on_the_fly_keeps_only_tokens_and_the_heldout_blocks(stored_run, live_run):
    sdir, ldir = stored_run[0] / "store", live_run[0] / "store"
    kept = _activation_chunks(ldir)
    assert kept and kept < _activation_chunks(sdir)
    on_disk = store_lib.ActivationStore.open(str(ldir))
    done = {(b, s) for b in range(on_disk.meta.num_blocks) for s in range(3) if on_disk.is_done(b, s)}
    assert done == {(b, s) for b in (8, 9) for s in range(3)}
    assert all(on_disk.is_done(b) for b in range(on_disk.meta.num_blocks))   # every block's tokens
    full = store_lib.ActivationStore.open(str(sdir))
    assert on_disk.meta == full.meta                                        # the same store, partly written
    np.testing.assert_array_equal(on_disk.read_blocks([8, 9]), full.read_blocks([8, 9]))
    np.testing.assert_array_equal(on_disk.read_tokens(0, 300)["token_ids"], full.read_tokens(0, 300)["token_ids"])
    # reading it as a plain store names the missing units and the command that writes them
    with pytest.raises(store_lib.IncompleteStoreError, match=r"block 0 snapshot step0.*python -m crossjax.activations"):
        on_disk.read_blocks([0])


def test_a_stored_run_on_the_same_store_writes_only_the_missing_activations(root, stored_run, live_run, tmp_path):
    import shutil
    from crossjax import activations
    partial = tmp_path / "store"
    shutil.copytree(live_run[0] / "store", partial)
    kept = {p: p.stat().st_mtime_ns for p in (partial / "activations").rglob("*") if p.is_file()}
    url = activations.ensure_activations(_config(root, partial), None, progress=False)
    filled, full = store_lib.ActivationStore.open(url), store_lib.ActivationStore.open(str(stored_run[0] / "store"))
    assert filled.is_complete()
    np.testing.assert_array_equal(filled.read_blocks(range(10)), full.read_blocks(range(10)))
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p.name != "zarr.json")  # held-out untouched


def test_an_interrupted_on_the_fly_run_resumes_to_the_uninterrupted_numbers(root, live_run, tmp_path):
    config = _config(root, tmp_path / "store", **{"data.on_the_fly": True})
    first = pipeline.run(config, str(tmp_path / "run"), stop_after=6)   # checkpoint at 4, stop (and save) at 6
    assert isinstance(first, pipeline.Stopped) and first.step == 6
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    pipeline.run(config, str(tmp_path / "run"))
    want, got = train_records(live_run[0] / "run"), train_records(tmp_path / "run")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(want, got):
        for key in ("loss", "ev", "l0"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f"step {a['step']} {key}")
    ww, wg = exported(live_run[0] / "run"), exported(tmp_path / "run")
    for k in ww:
        np.testing.assert_allclose(wg[k], ww[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_the_memory_plan_counts_the_resident_snapshot_models(root, live_run, capsys):
    from crossjax import activations, live_store
    from safetensors.numpy import load_file
    config = pipeline.bind_suite(_config(root, live_run[0] / "store", **{"data.on_the_fly": True}))
    live = live_store.open_live(activations.prepare_store(config, None), config, stored_tail_blocks=2)
    # closed form: every tensor of the 3 snapshots in float32 (too small to be split: every device holds all)
    weights = sum(v.size * 4 for n in ("step0", "step1", "step2")
                  for v in load_file(str(root / n / "model.safetensors")).values())
    assert live.device_bytes == weights
    # and crossjax.plan counts the same from the snapshots' config.json alone
    assert plan.snapshot_models_bytes(config, jax.local_device_count()) == weights
    capsys.readouterr()
    # the written part passed to run() as an opened store (as crossjax.compare does): the rest is computed again
    opened = store_lib.ActivationStore.open(str(live_run[0] / "store"))
    again = pipeline.run(config, str(live_run[0] / "run"), store=opened)
    said = capsys.readouterr().err
    assert "snapshot models" in said and f"{weights / 2 ** 20:.3f} MiB" in said
    assert again.heldout == live_run[1].heldout


def test_non_finite_rows_computed_on_the_fly_are_named(root, live_run, monkeypatch):
    from crossjax import activations, live_store
    real = activations.hook_forward
    made = []

    def overflowing(model, hook, out_dtype, mesh, **kw):   # the second snapshot's forward overflows float16
        forward = real(model, hook, out_dtype, mesh, **kw)
        made.append(forward)
        if len(made) != 2:
            return forward
        return lambda ids: np.where(np.arange(ids.shape[1])[None, :, None] == 3, np.inf, forward(ids)).astype(out_dtype)

    monkeypatch.setattr(activations, "hook_forward", overflowing)
    config = pipeline.bind_suite(_config(root, live_run[0] / "store", **{"data.on_the_fly": True}))
    live = live_store.open_live(activations.prepare_store(config, None), config, stored_tail_blocks=2)
    with pytest.raises(CrossjaxError, match=r"on the fly .* NaN or Inf in float16: row \d+ \(block 1, snapshot step1\)"
                                            r".*store.dtype='bfloat16'"):
        live.read_blocks([1])
    np.testing.assert_array_equal(live.read_blocks([8]), store_lib.ActivationStore.open(live.url).read_blocks([8]))


def test_on_the_fly_needs_model_snapshots(tmp_path):
    c = configs.base_config()
    c.data.on_the_fly = True                    # data.source is "planted"
    with pytest.raises(CrossjaxError, match=r"on_the_fly=True computes model activations.*data.source='snapshots'"):
        config_checks.validate(c)
    c.data.source, c.model.snapshots = "snapshots", ["step0"]
    config_checks.validate(c)
    c.eval.report = True                        # the report's feature index reads the run's LiveStore
    config_checks.validate(c)
    assert not list(tmp_path.iterdir())


# ---- after training: the run's FeatureIndex (report, complexity) over the rows the snapshots compute ---------------

_INDEX_ARGS = dict(top_k=5, batch_rows=64, window=3, histogram_bins=16, progress=False)


def _assert_same_index(got, want):
    assert sorted(got._a) == sorted(want._a)
    for name in want._a:
        np.testing.assert_array_equal(got._a[name], want._a[name], err_msg=name)
    assert {k: v for k, v in got.info.items() if k != "store_url"} == \
        {k: v for k, v in want.info.items() if k != "store_url"}


def _report_data(path: Path, kind: str):
    """The value a report data script passes to crossjaxData."""
    import json
    text = path.read_text().strip()
    return json.loads(text[text.index(",", len(f'crossjaxData("{kind}",')) + 1:-2])


def test_the_feature_index_of_an_on_the_fly_run_equals_the_one_over_the_written_store(stored_run, live_run):
    from crossjax import live_store
    from crossjax.analysis.lookup import FeatureIndex
    workdir, written = live_run[0] / "run", str(stored_run[0] / "store")
    chunks = _activation_chunks(live_run[0] / "store")
    got = FeatureIndex.build(workdir, **_INDEX_ARGS)          # the store named by summary.json: held-out rows only
    assert isinstance(got._store, live_store.LiveStore) and got.info["store_url"] == str(live_run[0] / "store")
    # the reference: the same export over the store the activation stage wrote for the same config
    want = FeatureIndex.build(workdir, store_url=written, **_INDEX_ARGS)
    assert not isinstance(want._store, live_store.LiveStore)
    assert got.rows_scanned == want.rows_scanned == 300 and want.info["store_url"] == written
    assert (got._a["top_row"] < 256).any() and got._a["count"].sum() > 0    # training rows were indexed
    _assert_same_index(got, want)
    # nothing was written into the on-the-fly store: its training blocks are still unfinished
    assert not store_lib.ActivationStore.open(got.info["store_url"]).is_done(0, 0)
    assert _activation_chunks(live_run[0] / "store") == chunks


def test_the_report_of_an_on_the_fly_run_has_its_feature_contexts(stored_run, live_run, tmp_path):
    import shutil
    from crossjax.analysis import run_index
    from crossjax.analysis.lookup import FeatureIndex
    from crossjax.report import write_report
    workdir = tmp_path / "run"                      # a moved copy of the workdir: the store is found where it is
    shutil.copytree(live_run[0] / "run", workdir)
    report = Path(write_report(workdir, context_features=8, contexts_per_snapshot=4, progress=False)).parent
    saved = FeatureIndex.load(run_index.index_path(workdir))      # the run's one index, shared with complexity
    want = FeatureIndex.build(workdir, store_url=str(stored_run[0] / "store"), max_rows=run_index.DEFAULT_ROWS,
                              top_k=4, window=run_index.WINDOW, progress=False)
    _assert_same_index(saved, want)
    # the pages show the frequencies and top contexts of that index
    meta = _report_data(report / "data" / "meta.js", "meta")
    assert meta["has_frequency"] and meta["rows_scanned"] == 300, meta["contexts_note"]
    records = _report_data(report / "data" / "feature" / "feature_00000.js", "feature")   # features 0, 1, ...
    shown = {f: r["ctx"] for f, r in enumerate(records) if r["ctx"]}
    assert len(shown) >= 8
    for f, ctx in shown.items():
        top = want._a["top_row"][f]
        assert [e[0] for e in ctx["ex"]] == top[top >= 0][:4].tolist(), f
    # the next consumer (complexity scoring) reuses it as it is
    built = (Path(run_index.index_path(workdir)) / "feature_index.npz").stat().st_mtime_ns
    run_index.run_index(workdir, rows=run_index.DEFAULT_ROWS, top_k=4, progress=False)
    assert (Path(run_index.index_path(workdir)) / "feature_index.npz").stat().st_mtime_ns == built


def test_an_on_the_fly_index_without_its_snapshots_names_the_missing_one(root, live_run, tmp_path):
    import shutil
    from crossjax.analysis.lookup import FeatureIndex
    workdir = tmp_path / "run"
    shutil.copytree(live_run[0] / "run", workdir)
    gone = root / "step1"
    gone.rename(root / "step1.moved")                # the fault: a snapshot the training rows need is gone
    try:
        with pytest.raises(CrossjaxError, match=rf"data.on_the_fly=True: it keeps the activations of the held-out "
                           rf"blocks only.*snapshot directory '{gone}' does not exist.*Put the run's snapshots "
                           r"\['step0', 'step1', 'step2'\] back where its config.json names them \(model.path_template="):
            FeatureIndex.build(workdir, **_INDEX_ARGS)
    finally:
        (root / "step1.moved").rename(gone)
    assert not (workdir / "index").exists()
    assert FeatureIndex.build(workdir, **_INDEX_ARGS).rows_scanned == 300     # back in place: it builds


def test_an_on_the_fly_index_over_changed_snapshots_names_the_changed_one(root, live_run):
    from safetensors.numpy import load_file, save_file
    from crossjax.analysis.lookup import FeatureIndex
    weights = root / "step2" / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1       # the fault: another snapshot now stands where the run's step2 was
    save_file(tensors, str(weights), metadata={"format": "np"})
    try:
        with pytest.raises(CrossjaxError, match=rf"not the snapshots it was computed from: step2 \({root / 'step2'}: "
                           r"weights hash \w+, the store's \w+\)\. Put the run's snapshots"):
            FeatureIndex.build(live_run[0] / "run", **_INDEX_ARGS)
    finally:
        weights.write_bytes(original)
