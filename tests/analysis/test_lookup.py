"""FeatureIndex against brute force: crosscoder.forward over every row, direct counts, hand-made token stores."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from crossjax import crosscoder, crosscoder_export, planted
from crossjax.analysis.lookup import FeatureIndex
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore, StoreMeta
from crossjax.summary import RunSummary

S, D, F = 3, 8, 12
PLANTED = dict(num_snapshots=S, d_model=D, num_features=6, num_rows=600, block_rows=128, firing_prob=0.25,
               noise_std=0.05, seed=3)

# Decoder norm profiles of the first features (the rest are random): emergent at snapshot 2, persistent,
# initialisation, dead.
PROFILES = {0: [0.0, 0.2, 1.0], 1: [1.0, 1.0, 1.0], 2: [1.0, 0.6, 0.1], 3: [0.0, 0.0, 0.0]}
ROTATING = 4  # this feature's decoder turns by 90 degrees between snapshots 1 and 2


def make_params(activation, seed=0, k=3):
    rng = np.random.default_rng(seed)
    w_enc = rng.normal(size=(S, D, F)) * 0.4
    direction = rng.normal(size=(F, D))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    w_dec = np.repeat(direction[None], S, axis=0) * rng.uniform(0.5, 1.5, size=(S, F, 1))
    for f, prof in PROFILES.items():
        w_dec[:, f] = np.asarray(prof)[:, None] * direction[f]
    other = np.linalg.svd(direction[ROTATING][None])[2][1]  # a unit vector orthogonal to the feature's direction
    w_dec[2, ROTATING] = other
    params = {"W_enc": w_enc, "b_enc": rng.normal(size=F) * 0.2 - 0.3, "W_dec": w_dec,
              "b_dec": rng.normal(size=(S, D)) * 0.1, "log_threshold": np.log(rng.uniform(0.2, 1.0, size=F))}
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation=activation, k=k)
    return {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}, cfg


def make_workdir(path, params, scales, cfg, store_url, snapshots):
    """A workdir as training leaves it: export/, summary.json naming the store and snapshots, and config.json
    (the training config, which must not be mistaken for the export's)."""
    export = path / "export"
    crosscoder_export.export_params(params, scales, cfg, str(export))
    (path / "config.json").write_text(json.dumps({"crosscoder": {"num_features": F}}))
    RunSummary(workdir=str(path), store=store_url, steps=1, tokens=1, snapshots=list(snapshots),
               num_features=cfg.num_features, init_norm=1.0, scales=[float(v) for v in np.asarray(scales)],
               export=str(export), evolution={}, evals={}).write(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("planted") / "store")
    planted.generate_planted(url, PLANTED)
    return ActivationStore.open(url)


def reference_acts(store, params, cfg, scales, batch_rows, n=None):
    """Per-row activations [N,F] and per-snapshot gates [N,S,F] from crosscoder.forward (batch by batch, which
    only BatchTopK depends on)."""
    n = store.meta.num_rows if n is None else n
    values, gates = [], []
    for a in range(0, n, batch_rows):
        x = crosscoder.normalize(jnp.asarray(store.read_rows(a, min(a + batch_rows, n)), jnp.float32), scales)
        acts = np.asarray(crosscoder.forward(params, x, cfg)["acts"], np.float32)
        if acts.ndim == 3:  # jumprelu: f[b,s,i] is h or 0, so the row's value is the max over snapshots
            gates.append(acts > 0)
            acts = acts.max(axis=1)
        else:
            gates.append(np.repeat((acts > 0)[:, None], S, axis=1))
        values.append(acts)
    return np.concatenate(values), np.concatenate(gates)


def brute_top(values, k):
    """[F] lists of (row, value): active rows by value descending, lower row first among equals."""
    out = []
    for f in range(values.shape[1]):
        v = values[:, f]
        order = np.lexsort((np.arange(len(v)), -v))
        order = order[v[order] > 0][:k]
        out.append((order, v[order]))
    return out


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "topk", "batchtopk"])
def test_index_matches_brute_force(store, tmp_path, activation):
    params, cfg = make_params(activation)
    scales = store.estimate_scales()
    work = make_workdir(tmp_path, params, scales, cfg, store.url, store.meta.snapshots)
    batch_rows, top_k = 100, 5  # batches straddle the 128-row blocks and the short last block
    index = FeatureIndex.build(work, top_k=top_k, batch_rows=batch_rows, window=0, progress=False)
    values, gates = reference_acts(store, params, cfg, scales, batch_rows)
    n = store.meta.num_rows
    assert index.rows_scanned == n
    active = values > 0
    assert active.any(axis=0).sum() >= F // 2  # the case is not degenerate
    np.testing.assert_array_equal(index.counts, active.sum(axis=0))
    np.testing.assert_array_equal(index.counts_per_snapshot, gates.sum(axis=0))
    np.testing.assert_allclose(index.frequency, active.mean(axis=0), rtol=1e-12)
    mean = np.where(active.any(0), (values * active).sum(0) / np.maximum(active.sum(0), 1), 0.0)
    np.testing.assert_allclose(index.mean_activation, mean, rtol=1e-5, atol=1e-6)
    tokens = store.read_tokens(0, n)
    for f, (rows, vals) in enumerate(brute_top(values, top_k)):
        ex = index.top_examples(f)
        assert [e.row for e in ex] == rows.tolist(), f"feature {f}"
        np.testing.assert_allclose([e.value for e in ex], vals, rtol=1e-5)
        assert [e.token_id for e in ex] == tokens["token_ids"][rows].tolist()
        assert [e.context_id for e in ex] == tokens["context_ids"][rows].tolist()
    # the row view agrees with the same brute force
    for row in (0, 137, n - 1):
        got = index.features_for_row(row, k=F)
        want = [f for f in np.lexsort((np.arange(F), -values[row])) if values[row, f] > 0]
        assert [f for f, _ in got] == want
        np.testing.assert_allclose([v for _, v in got], values[row, want], rtol=1e-5)


def test_max_rows_scans_a_prefix_and_counts_directly(store, tmp_path):
    params, cfg = make_params("jumprelu", seed=1)
    scales = store.estimate_scales()
    export = make_workdir(tmp_path, params, scales, cfg, store.url, store.meta.snapshots) / "export"
    index = FeatureIndex.build(export, store.url, max_rows=250, top_k=4, batch_rows=64, progress=False)
    values, _ = reference_acts(store, params, cfg, scales, 64, n=250)
    assert index.rows_scanned == 250
    np.testing.assert_array_equal(index.counts, (values > 0).sum(axis=0))
    for f, (rows, _) in enumerate(brute_top(values, 4)):
        assert [e.row for e in index.top_examples(f)] == rows.tolist()
        assert all(r < 250 for r in rows)


def test_evolution_fields_and_search(store, tmp_path):
    params, cfg = make_params("jumprelu")
    scales = store.estimate_scales()
    work = make_workdir(tmp_path, params, scales, cfg, store.url, store.meta.snapshots)
    index = FeatureIndex.build(work, top_k=3, batch_rows=256, progress=False)
    names = store.meta.snapshots
    r0 = index.feature(0)
    assert r0.kind == "emergent" and r0.emergence == names[2]
    np.testing.assert_allclose(r0.norms, PROFILES[0], atol=1e-6)
    np.testing.assert_allclose(r0.strength, [0.0, 0.2, 1.0], atol=1e-6)
    assert index.feature(1).kind == "persistent" and index.feature(1).emergence == names[0]
    assert index.feature(2).kind == "initialisation"
    r3 = index.feature(3)
    assert r3.kind == "dead" and r3.emergence is None and r3.frequency == 0 and r3.top_examples == ()
    rot = index.feature(ROTATING)
    np.testing.assert_allclose(rot.consecutive_cosine, [1.0, 0.0], atol=1e-6)
    assert rot.sharpest_rotation == names[2]
    np.testing.assert_allclose(rot.cosine_to_final, [0.0, 0.0, 1.0], atol=1e-6)
    assert 0 in index.search(emerged_at=names[2], kind="emergent")
    assert 0 in index.search(emerged_at=2)
    assert 1 not in index.search(emerged_at=names[2])
    assert 3 in index.search(kind="dead", max_frequency=0.0)
    freq = index.frequency
    hot = index.search(min_frequency=0.1)
    np.testing.assert_array_equal(hot, np.flatnonzero(freq >= 0.1))
    assert "emergent" in str(r0)


def test_save_load_round_trip(store, tmp_path):
    params, cfg = make_params("relu")
    scales = store.estimate_scales()
    work = make_workdir(tmp_path / "work", params, scales, cfg, store.url, store.meta.snapshots)
    index = FeatureIndex.build(work, top_k=4, batch_rows=200, window=1, progress=False)
    path = index.save(tmp_path / "index")
    loaded = FeatureIndex.load(path)
    assert repr(loaded) == repr(index) and loaded.info == index.info
    for f in range(F):
        a, b = index.feature(f), loaded.feature(f)
        assert a.top_examples == b.top_examples and a.kind == b.kind and a.emergence == b.emergence
        np.testing.assert_array_equal(a.norms, b.norms)
        assert a.frequency == b.frequency and a.mean_activation == b.mean_activation
    np.testing.assert_array_equal(loaded.search(min_frequency=0.05), index.search(min_frequency=0.05))
    # queries needing the weights and the store reopen them from the saved locations
    assert loaded.features_for_row(5) == index.features_for_row(5)


def test_errors(store, tmp_path):
    params, cfg = make_params("jumprelu")
    scales = store.estimate_scales()
    work = make_workdir(tmp_path / "work", params, scales, cfg, store.url, store.meta.snapshots)
    index = FeatureIndex.build(work, top_k=3, batch_rows=300, progress=False)
    for bad in (F, -1, 1.5, True):
        with pytest.raises(CrossjaxError, match="out of range"):
            index.feature(bad)
    with pytest.raises(CrossjaxError, match="top 3"):
        index.top_examples(0, k=4)
    with pytest.raises(CrossjaxError, match="kind"):
        index.search(kind="sideways")
    with pytest.raises(CrossjaxError, match="not one of"):
        index.search(emerged_at="step7")
    with pytest.raises(CrossjaxError, match="out of range"):
        index.features_for_row(store.meta.num_rows)

    # an export for another d_model: the message names the export and the store
    p2, cfg2 = make_params("jumprelu")
    cfg2 = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=4, num_features=F)
    p2 = {k: v[..., :4] if k in ("W_dec", "b_dec") else v for k, v in p2.items()}
    p2["W_enc"] = p2["W_enc"][:, :4]
    other = make_workdir(tmp_path / "other", p2, scales, cfg2, store.url, store.meta.snapshots)
    with pytest.raises(CrossjaxError, match=r"d_model 4.*d_model 8") as e:
        FeatureIndex.build(other, progress=False)
    assert str(other / "export") in str(e.value) and store.url in str(e.value)
    # trained on other snapshots
    renamed = make_workdir(tmp_path / "renamed", params, scales, cfg, store.url, ["a", "b", "c"])
    with pytest.raises(CrossjaxError, match=r"\['a', 'b', 'c'\]"):
        FeatureIndex.build(renamed, progress=False)
    # missing pieces
    with pytest.raises(CrossjaxError, match="does not exist"):
        FeatureIndex.build(tmp_path / "nowhere", store.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossjaxError, match="neither a crosscoder export"):
        FeatureIndex.build(tmp_path / "empty", store.url)
    unnamed = make_workdir(tmp_path / "unnamed", params, scales, cfg, "", [])
    with pytest.raises(CrossjaxError, match="no store_url"):
        FeatureIndex.build(unnamed, progress=False)
    (unnamed / "summary.json").write_text(json.dumps({"version": 3, "store": store.url}))
    with pytest.raises(CrossjaxError, match="version 3"):  # read through RunSummary, with its message
        FeatureIndex.build(unnamed, progress=False)
    with pytest.raises(CrossjaxError, match="not a saved FeatureIndex"):
        FeatureIndex.load(tmp_path / "empty")
    (work / "export" / "model.safetensors").unlink()
    with pytest.raises(CrossjaxError, match="model.safetensors"):
        FeatureIndex.build(work, progress=False)
    # attaching a different store is refused
    other_store = planted.ensure_planted(dict(PLANTED, seed=4), str(tmp_path / "store2"))
    with pytest.raises(CrossjaxError, match="not the one this index was built from"):
        index.attach(store_url=other_store.url)


# ------------------------------------------------------------------------------------------------------------
# Context windows on a hand-made store

T = 10
LENGTHS = {0: 10, 1: 10, 2: 7}  # context 2 is padded after position 6


def token_of(c, p):
    return 100 * c + p


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
    """Rows = every (context, position >= 1) pair (BOS at 0 is not stored), in a shuffled order. Feature 0 of the
    crosscoder below reads x[row, :, 0], which holds a distinct value per row."""
    pairs = [(c, p) for c, n in LENGTHS.items() for p in range(1, n)]
    order = np.random.default_rng(0).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    n = len(pairs)
    meta = StoreMeta(snapshots=("s0", "s1"), d_model=4, num_rows=n, block_rows=8, dtype="float16", model="test",
                     hook="blocks.0.hook_resid_post", context_len=T)
    url = str(tmp_path_factory.mktemp("tokens") / "store")
    st = ActivationStore.create(url, meta)
    value = np.random.default_rng(1).permutation(n).astype(np.float32) / 8 + 0.5  # distinct, exact in fp16
    for b in range(meta.num_blocks):
        a, z = st.block_range(b)
        x = np.zeros((z - a, 4), np.float32)
        x[:, 0] = value[a:z]
        st.write_block(b, 0, x)
        st.write_block(b, 1, x)
        ctx = np.array([pairs[r][0] for r in range(a, z)])
        pos = np.array([pairs[r][1] for r in range(a, z)])
        st.write_tokens(b, token_of(ctx, pos), ctx, pos)
    return st, pairs, value


def token_crosscoder():
    cfg = crosscoder.CrosscoderConfig(num_snapshots=2, d_model=4, num_features=2, activation="relu")
    w_enc = np.zeros((2, 4, 2), np.float32)
    w_enc[0, 0, 0] = 1.0  # feature 0 = the value planted in x[:, 0, 0]
    w_enc[1, 1, 1] = 1.0  # feature 1 never fires (x[:, 1, 1] = 0, bias 0)
    w_dec = np.ones((2, 2, 4), np.float32)
    return {"W_enc": w_enc, "b_enc": np.zeros(2, np.float32), "W_dec": w_dec, "b_dec": np.zeros((2, 4), np.float32),
            "log_threshold": np.zeros(2, np.float32)}, cfg


def test_context_windows_reproduce_the_written_tokens(token_store, tmp_path):
    st, pairs, value = token_store
    params, cfg = token_crosscoder()
    work = make_workdir(tmp_path, params, np.ones(2), cfg, st.url, st.meta.snapshots)
    index = FeatureIndex.build(work, top_k=6, batch_rows=5, window=2, progress=False)
    top_rows = np.argsort(-value)[:6]
    examples = index.top_examples(0)
    assert [e.row for e in examples] == top_rows.tolist()
    np.testing.assert_array_equal([e.value for e in examples], value[top_rows])
    assert index.top_examples(1) == []

    def expected(c, p, w):
        positions = list(range(max(0, p - w), min(T, p + w + 1)))
        return positions, [token_of(c, q) if 1 <= q < LENGTHS[c] else -1 for q in positions]

    for e in examples:
        c, p = pairs[e.row]
        assert (e.context_id, e.position, e.token_id) == (c, p, token_of(c, p))
        positions, tokens = expected(c, p, 2)
        assert list(e.positions) == positions and list(e.tokens) == tokens
    # a wider window than built reads the token arrays again, for this feature only
    for e in index.top_examples(0, k=3, window=4):
        positions, tokens = expected(*pairs[e.row], 4)
        assert list(e.positions) == positions and list(e.tokens) == tokens
    # decoded text with the activating token marked; a tokenizer.json path works as well as the object
    import tokenizers
    from tokenizers.models import WordLevel

    tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    for t in (tok, tmp_path / "tokenizer.json", tmp_path):
        e = index.top_examples(0, k=1, tokenizer=t)[0]
        c, p = pairs[e.row]
        positions, tokens = expected(c, p, 2)
        words = [f"w{x}" for x in tokens]
        at = positions.index(p)
        before = " ".join(w for w, x in zip(words[:at], tokens[:at]) if x >= 0)
        after = " ".join(w for w, x in zip(words[at + 1:], tokens[at + 1:]) if x >= 0)
        assert e.text == f"{before}[[w{token_of(c, p)}]]{after}"
    # the widened window survives save/load
    loaded = FeatureIndex.load(index.save(tmp_path / "index"))
    assert loaded.top_examples(0, k=3, window=4) == index.top_examples(0, k=3, window=4)
    with pytest.raises(CrossjaxError, match="tokenizer file"):
        index.top_examples(0, tokenizer=tmp_path / "missing.json")


def test_ties_keep_the_lower_rows_across_batches(tmp_path):
    value = np.array([1, 2, 0, 2, 1, 3, 2, 2, 0, 3, 2, 1], np.float32)
    meta = StoreMeta(snapshots=("s0", "s1"), d_model=4, num_rows=len(value), block_rows=4, dtype="float16",
                     model="test", hook="blocks.0.hook_resid_post")
    st = ActivationStore.create(str(tmp_path / "store"), meta)
    for b in range(meta.num_blocks):
        a, z = st.block_range(b)
        x = np.zeros((z - a, 4), np.float32)
        x[:, 0] = value[a:z]
        st.write_block(b, 0, x)
        st.write_block(b, 1, x)
        rows = np.arange(a, z)
        st.write_tokens(b, rows, rows, np.zeros_like(rows))
    params, cfg = token_crosscoder()
    work = make_workdir(tmp_path / "work", params, np.ones(2), cfg, st.url, meta.snapshots)
    for batch_rows in (1, 3, 5, 12):  # a tie is resolved the same way inside a batch and across batches
        index = FeatureIndex.build(work, top_k=6, batch_rows=batch_rows, progress=False)
        assert [e.row for e in index.top_examples(0)] == [5, 9, 1, 3, 6, 7]
        assert index.counts[0] == 10


# ------------------------------------------------------------------------------------------------------------
# Top rows per snapshot and activation histograms, against brute force over every row


def reference_per_snapshot(store, params, cfg, scales, batch_rows):
    """crosscoder.forward's acts as [N,S,F] (shared activations repeated at every snapshot)."""
    parts = []
    for a in range(0, store.meta.num_rows, batch_rows):
        x = crosscoder.normalize(jnp.asarray(store.read_rows(a, min(a + batch_rows, store.meta.num_rows))), scales)
        acts = np.asarray(crosscoder.forward(params, x, cfg)["acts"], np.float32)
        parts.append(acts if acts.ndim == 3 else np.repeat(acts[:, None], S, axis=1))
    return np.concatenate(parts)


def brute_histograms(acts, bins):
    """(counts [S,F,B], edges [F,B+1]) with each feature's range [0, 2^e), e = frexp(its largest value)."""
    n, s, f = acts.shape
    exponent = np.frexp(acts.max(axis=(0, 1)))[1]
    counts = np.zeros((s, f, bins), np.int64)
    for j in range(f):
        v = acts[:, :, j]
        b = np.minimum(np.floor(np.ldexp(v, int(np.log2(bins)) - exponent[j])).astype(int), bins - 1)
        for t in range(s):
            counts[t, j] = np.bincount(b[v[:, t] > 0, t], minlength=bins)
    edges = np.ldexp(1.0, exponent)[:, None] * np.arange(bins + 1)[None] / bins
    return counts, edges


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_top_rows_per_snapshot_and_histograms_match_brute_force(store, tmp_path, activation):
    params, cfg = make_params(activation, seed=2)
    scales = store.estimate_scales()
    work = make_workdir(tmp_path, params, scales, cfg, store.url, store.meta.snapshots)
    batch_rows, top_k, bins = 100, 6, 16
    index = FeatureIndex.build(work, top_k=top_k, batch_rows=batch_rows, window=0, histogram_bins=bins,
                               progress=False)
    acts = reference_per_snapshot(store, params, cfg, scales, batch_rows)  # [N,S,F]
    rows = np.arange(len(acts))
    differ = 0
    for f in range(F):
        lists = []
        for s, name in enumerate(store.meta.snapshots):
            v = acts[:, s, f]
            want = np.lexsort((rows, -v))
            want = want[v[want] > 0][:top_k]
            got = index.top_examples(f, snapshot=name)
            assert [e.row for e in got] == want.tolist(), (f, name)
            np.testing.assert_allclose([e.value for e in got], v[want], rtol=1e-5)
            assert [e.row for e in index.top_examples(f, k=2, snapshot=s)] == want[:2].tolist()
            lists.append(want.tolist())
        differ += any(lst != lists[0] for lst in lists)
    if activation == "jumprelu":  # the gates differ between snapshots: so do some features' top rows
        assert differ >= 2  # features 0 (no decoder at snapshot 0) and 2 (weak at the last)
    else:
        assert differ == 0
    counts, edges = brute_histograms(acts, bins)
    assert counts.sum() > 1000  # not degenerate
    for f in range(F):
        h = index.histogram(f)
        assert h.snapshots == store.meta.snapshots and h.counts.shape == (S, bins)
        if counts[:, f].sum():
            np.testing.assert_array_equal(h.counts, counts[:, f], err_msg=f"feature {f}")
            np.testing.assert_array_equal(h.edges, edges[f])
            np.testing.assert_array_equal(h.counts.sum(axis=1), index.counts_per_snapshot[:, f])
        else:
            assert np.isnan(h.edges).all() and not h.counts.any()
    # saved and loaded: the same answers
    loaded = FeatureIndex.load(index.save(tmp_path / "index"))
    for f in (0, 5, 9):
        assert loaded.top_examples(f, snapshot=1) == index.top_examples(f, snapshot=1)
        np.testing.assert_array_equal(loaded.histogram(f).counts, index.histogram(f).counts)
    with pytest.raises(CrossjaxError, match="not one of"):
        index.top_examples(0, snapshot="step7")


def test_histograms_in_large_batches_and_moved_to_the_host_count_the_same(store, tmp_path, monkeypatch):
    """A batch larger than the rows binned at once (256) is binned in overlapping chunks; device counts are int32
    and move to int64 host counts before they could overflow: with that limit lowered to a few batches, the
    counts (merged across range changes on both sides) are still the brute-force ones."""
    from crossjax.analysis import activation_histograms

    params, cfg = make_params("jumprelu", seed=2)
    scales = store.estimate_scales()
    work = make_workdir(tmp_path, params, scales, cfg, store.url, store.meta.snapshots)
    counts, edges = brute_histograms(reference_per_snapshot(store, params, cfg, scales, 100), 8)
    whole = FeatureIndex.build(work, top_k=2, batch_rows=300, window=0, histogram_bins=8, progress=False)
    monkeypatch.setattr(activation_histograms, "_INT32_ROOM", 120)
    moved = FeatureIndex.build(work, top_k=2, batch_rows=50, window=0, histogram_bins=8, progress=False)
    for index in (whole, moved):
        for f in range(F):
            if counts[:, f].sum():
                np.testing.assert_array_equal(index.histogram(f).counts, counts[:, f], err_msg=f"feature {f}")
                np.testing.assert_array_equal(index.histogram(f).edges, edges[f])


@pytest.mark.parametrize("bins", [0, 3, 2.0, True])
def test_histogram_bins_must_be_a_power_of_two(store, tmp_path, bins):
    params, cfg = make_params("relu")
    work = make_workdir(tmp_path, params, store.estimate_scales(), cfg, store.url, store.meta.snapshots)
    with pytest.raises(CrossjaxError, match=rf"histogram_bins={bins!r} must be a power of two"):
        FeatureIndex.build(work, histogram_bins=bins, progress=False)
