"""FeatureIndex.run on new text, against the store: a run's workdir over tiny GPT-NeoX snapshots (the activation
stage wrote its store), a crosscoder exported into it; text taken from the store's own contexts must give the
stored rows' activations. Then the faults: changed snapshot weights or tokenizer, no config, planted runs."""
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import _activations_fixtures as fx
from crossjax import activations, crosscoder, crosscoder_export
from crossjax import store as store_lib
from crossjax import workdir as workdir_lib
from crossjax.analysis.lookup import FeatureIndex
from crossjax.errors import CrossjaxError
from crossjax.summary import RunSummary

S, D, F = 3, 32, 24
T = 24  # fx.make_config's context_len


def random_crosscoder(activation="jumprelu", seed=0):
    """Weights under which each feature fires on a fair share of the rows, at some snapshots more than others."""
    rng = np.random.default_rng(seed)
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation=activation, k=4)
    w_dec = rng.normal(size=(S, F, D)) * rng.uniform(0.2, 1.5, size=(S, F, 1)) / np.sqrt(D)
    params = {"W_enc": rng.normal(size=(S, D, F)) / np.sqrt(S * D), "b_enc": np.full(F, 0.05),
              "W_dec": w_dec, "b_dec": np.zeros((S, D)), "log_threshold": np.log(np.full(F, 0.3))}
    return {k: np.asarray(v, np.float32) for k, v in params.items()}, cfg


def make_run(root, work, store_url, config, activation="jumprelu"):
    """A workdir as a finished run leaves it: config.json, export/, summary.json naming the store."""
    store = store_lib.ActivationStore.open(store_url)
    params, cfg = random_crosscoder(activation)
    scales = store.estimate_scales()
    crosscoder_export.export_params(params, scales, cfg, str(work / "export"))
    workdir_lib.record(config, str(work))
    RunSummary(workdir=str(work), store=store.url, steps=1, tokens=1, snapshots=list(store.meta.snapshots),
               num_features=F, init_norm=1.0, scales=scales.tolist(), export=str(work / "export"), evolution={},
               evals={}).write(str(work))
    return work, params, scales, cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("new_text")
    root = fx.make_root(base / "snaps")
    config = fx.make_config(root, base / "store")
    config.data.source = "snapshots"
    url = activations.ensure_activations(config, None, progress=False)
    work, params, scales, cfg = make_run(root, base / "work", url, config)
    index = FeatureIndex.build(work, top_k=4, batch_rows=64, progress=False)
    return dict(root=root, config=config, store=store_lib.ActivationStore.open(url), work=work, params=params,
                scales=scales, cfg=cfg, index=index)


def stored_contexts(store):
    """{context: (store rows, token ids)} in position order, for the contexts whose stored positions are 1..n."""
    t = store.read_tokens(0, store.meta.num_rows)
    out = {}
    for c in np.unique(t["context_ids"]):
        rows = np.flatnonzero(t["context_ids"] == c)
        rows = rows[np.argsort(t["positions"][rows])]
        if np.array_equal(t["positions"][rows], np.arange(1, len(rows) + 1)):
            out[int(c)] = (rows, t["token_ids"][rows])
    return out


def stored_acts(store, rows, params, scales, cfg):
    """crosscoder.forward's acts [n,S,F] of stored rows (shared activations repeated at every snapshot)."""
    x = np.stack([store.read_rows(int(r), int(r) + 1)[0] for r in rows])
    acts = np.asarray(crosscoder.forward({k: jnp.asarray(v) for k, v in params.items()},
                                         crosscoder.normalize(jnp.asarray(x), scales), cfg)["acts"])
    return acts if acts.ndim == 3 else np.repeat(acts[:, None], S, axis=1)


def assert_same_activations(got, want):
    """The same features fire with the same values, up to the float16 rounding of the stored rows (see
    test_the_hook_rows_are_the_stored_rows) and float32 sums over other batch shapes."""
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)


def test_the_hook_rows_are_the_stored_rows(run):
    """What the crosscoder reads: the rows run computes for a stored context's tokens are the stored rows, but for
    a few values one float16 step away (the activation stage ran the model on another batch shape, over 8
    devices, and float32 results round to the neighbouring float16 value)."""
    from crossjax import tokens as tokens_lib
    from crossjax.analysis import new_text
    from crossjax.models.snapshot_files import resolve_snapshot

    store, index = run["store"], run["index"]
    config = new_text.run_config(run["work"])
    sources = new_text._snapshot_sources(config, index.snapshots)
    tokenizer = tokens_lib.load_tokenizer(resolve_snapshot(*sources[-1]))
    for rows, ids in list(stored_contexts(store).values())[:3]:
        input_ids, position = new_text.text_contexts(np.asarray(ids), T, tokenizer)
        got = new_text.hook_rows(input_ids, position, sources[:-1], list(index.snapshots), config, index.info, 2,
                                 progress=False)
        want = np.stack([store.read_rows(int(r), int(r) + 1)[0] for r in rows])
        assert got.dtype == want.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2 ** -10, atol=1e-6)
        assert np.mean(got == want) > 0.98


def dense(result, n):
    """The frame as [n,S,F] activations (0 where nothing fires)."""
    out = np.zeros((n, S, F), np.float32)
    f = result.frame
    out[f["position"].to_numpy(), f["snapshot"].cat.codes.to_numpy(), f["feature"].to_numpy()] = f["activation"]
    return out


def test_text_from_the_store_gives_the_stored_rows_activations(run):
    store, index = run["store"], run["index"]
    contexts = stored_contexts(store)
    full = [c for c, (rows, _) in contexts.items() if len(rows) == T - 1]  # documents longer than a context
    short = [c for c, (rows, _) in contexts.items() if len(rows) < T - 1]
    assert len(full) >= 4 and short
    # one context, given as token ids
    rows, ids = contexts[short[0]]
    got = index.run(ids.tolist(), progress=False)
    want = stored_acts(store, rows, run["params"], run["scales"], run["cfg"])
    assert (want > 0).sum() > 20  # features fire: the comparison is not between zeros
    assert_same_activations(dense(got, len(rows)), want)
    assert list(got.frame.columns) == ["position", "token_id", "token", "snapshot", "feature", "activation"]
    assert got.frame["token_id"].tolist() == ids[got.frame["position"]].tolist()
    # four full contexts back to back: cut into the same four contexts, run two at a time, rows in small batches
    rows = np.concatenate([contexts[c][0] for c in full[:4]])
    ids = np.concatenate([contexts[c][1] for c in full[:4]])
    got = index.run(ids, contexts_per_batch=3, batch_rows=10, progress=False)
    assert_same_activations(dense(got, len(rows)), stored_acts(store, rows, run["params"], run["scales"], run["cfg"]))
    # the same tokens as text: the run's tokenizer gives them back, and so the same frame
    from crossjax.tokens import open_tokenizer
    tok = open_tokenizer(run["root"] / "step0")
    text = tok.decode(contexts[short[0]][1].tolist())
    assert tok.encode(text, add_special_tokens=False).ids == contexts[short[0]][1].tolist()
    as_text = index.run(text, progress=False)
    by_ids = index.run(contexts[short[0]][1], progress=False)
    assert as_text.frame.equals(by_ids.frame)
    assert "".join(as_text.tokens) == text


def test_frame_order_features_and_printed_view(run):
    index = run["index"]
    got = index.run("the cat sat on a mat while old dogs ran far", progress=False)
    frame = got.frame
    keys = list(zip(frame["position"], frame["snapshot"].cat.codes, -frame["activation"], frame["feature"]))
    assert keys == sorted(keys) and (frame["activation"] > 0).all()
    assert list(frame["snapshot"].cat.categories) == list(index.snapshots)
    only = index.run("the cat sat on a mat while old dogs ran far", features=[3, 7], progress=False)
    assert set(only.frame["feature"]) <= {3, 7}
    np.testing.assert_array_equal(only.frame.to_numpy(), frame[frame["feature"].isin([3, 7])].to_numpy())
    top = got.top(2)
    assert top.groupby(["position", "snapshot"], observed=True).size().max() <= 2
    view = str(got)
    lines = view.splitlines()
    assert len(lines) == 2 + len(got.token_ids) and all(name in lines[0] for name in index.snapshots)
    first = top[(top["position"] == 0)]
    for _, r in first.head(1).iterrows():
        assert f"{r['feature']}:{r['activation']:.2f}" in lines[2]
    # JumpReLU gates differ per snapshot: the firing sets are not all equal
    sets = [set(zip(g["position"], g["feature"])) for _, g in frame.groupby("snapshot", observed=True)]
    assert len(sets) == S and any(s != sets[0] for s in sets)


def test_a_changed_snapshot_or_tokenizer_is_named(run, tmp_path):
    index = run["index"]
    root = shutil.copytree(run["root"], tmp_path / "snaps")
    config = fx.make_config(root, tmp_path / "unused")
    config.data.source = "snapshots"
    work = tmp_path / "work"
    work.mkdir()
    workdir_lib.record(config, str(work))
    assert index.run("the cat", workdir=work, progress=False).frame.equals(index.run("the cat", progress=False).frame)
    shutil.copy(root / "step2" / "model.safetensors", root / "step1" / "model.safetensors")
    with pytest.raises(CrossjaxError, match=r"snapshot step1 at .*step1 holds other weights .* restore that snapshot"):
        index.run("the cat", workdir=work, progress=False)
    shutil.copy(run["root"] / "step1" / "model.safetensors", root / "step1" / "model.safetensors")
    other = fx.train_tokenizer(tmp_path / "other", vocab_size=300)  # another vocabulary
    shutil.copy(other, root / "step0" / "tokenizer.json")
    with pytest.raises(CrossjaxError, match=r"tokenizer of snapshot step0 differs"):
        index.run("the cat", workdir=work, progress=False)
    shutil.rmtree(root / "step0")
    with pytest.raises(CrossjaxError, match=r"step0.*does not exist"):
        index.run("the cat", workdir=work, progress=False)


def test_runs_that_cannot_run_text_are_named(run, tmp_path):
    index = run["index"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossjaxError, match=r"has no config.json.*pass workdir="):
        index.run("the cat", workdir=tmp_path / "empty", progress=False)
    planted = fx.make_config(run["root"], tmp_path / "unused")  # data.source stays 'planted'
    workdir_lib.record(planted, str(tmp_path / "empty"))
    with pytest.raises(CrossjaxError, match=r"data.source='planted'.*no model"):
        index.run("the cat", workdir=tmp_path / "empty", progress=False)
    loaded = FeatureIndex.load(index.save(tmp_path / "index"))  # a saved index still knows its run
    assert loaded.run("the cat", progress=False).frame.equals(index.run("the cat", progress=False).frame)
    shutil.copytree(run["work"] / "export", tmp_path / "alone")
    bare = FeatureIndex.build(tmp_path / "alone", run["store"].url, top_k=2, progress=False)
    with pytest.raises(CrossjaxError, match=r"does not know the run.*pass workdir="):
        bare.run("the cat", progress=False)
    nothing = index.run([0, 1, 0], progress=False)  # <|endoftext|> and <|padding|>: never stored, nothing fires
    assert nothing.frame.empty and list(nothing.frame.columns)[:2] == ["position", "token_id"]
    assert len(str(nothing).splitlines()) == 5
    for text, problem in (("", "has no tokens"), ([5, -1], r"must lie in 0\.\."), (3.5, "of type float"),
                          ([[1, 2]], "shape")):
        with pytest.raises(CrossjaxError, match=problem):
            index.run(text, progress=False)
    for kwargs, problem in ((dict(features=[F]), "must be feature ids"),
                            (dict(features=["a"]), "must be feature ids"), (dict(contexts_per_batch=0), ">= 1"),
                            (dict(batch_rows=True), "batch_rows=True")):
        with pytest.raises(CrossjaxError, match=problem):
            index.run("the cat", progress=False, **kwargs)


@pytest.mark.parametrize("activation", ["relu", "batchtopk"])
def test_shared_activations_are_listed_at_every_snapshot(run, tmp_path, activation):
    store = run["store"]
    work, params, scales, cfg = make_run(run["root"], tmp_path / "work", store.url, run["config"], activation)
    index = FeatureIndex.build(work, top_k=2, batch_rows=64, progress=False)
    contexts = stored_contexts(store)
    rows, ids = next(iter(contexts.values()))
    got = index.run(ids, progress=False)  # BatchTopK: the text's rows are its batch, as the reference's are
    want = stored_acts(store, rows, params, scales, cfg)
    assert (want > 0).sum() > 20
    assert_same_activations(dense(got, len(rows)), want)
    per_snapshot = [g[["position", "feature", "activation"]].to_numpy() for _, g in got.frame.groupby("snapshot",
                                                                                                      observed=True)]
    assert len(per_snapshot) == S and all(np.array_equal(p, per_snapshot[0]) for p in per_snapshot)
