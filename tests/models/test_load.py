"""Snapshot loading and saving against transformers' own save_pretrained / from_pretrained."""
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import torch  # noqa: F401  (the reference: CI installs it, a missing torch fails these tests)
import transformers  # noqa: F401

from crossjax.errors import CrossjaxError  # noqa: E402
from crossjax.models import GPTNeoX, NeoXConfig, Runner  # noqa: E402
from crossjax.models.load import (  # noqa: E402
    check_snapshots_consistent, load_snapshot, placed_bytes, resolve_snapshot, save_hf_snapshot)
from crossjax.models.snapshot_files import read_architecture  # noqa: E402

VOCAB = 1024  # embed_in / embed_out hold 64K elements: large enough to be sharded by default


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=84,
              rotary_pct=0.25, max_position_embeddings=32)  # 84: not divisible by 8 devices
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_model()
    single = tmp_path_factory.mktemp("single")
    model.save_pretrained(single)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="100KB")
    return model, single, sharded


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 10)).astype(np.int32)


def params_of(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_single_and_sharded_safetensors_load_identically(saved):
    hf, single, sharded = saved
    assert (sharded / "model.safetensors.index.json").is_file()
    a, b = load_snapshot(single), load_snapshot(sharded)
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    pa, pb = params_of(a.model), params_of(b.model)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    np.testing.assert_allclose(a.model(jnp.asarray(IDS)), hf_logits(hf, IDS), atol=1e-4, rtol=0)
    assert a.config.num_layers == 2 and a.path == single and a.tokenizer_path is None


def test_content_hash_tracks_the_weights(saved, tmp_path):
    hf, single, _ = saved
    base = load_snapshot(single).content_hash
    other = tmp_path / "changed"
    changed = hf_model()
    with torch.no_grad():
        changed.gpt_neox.layers[1].mlp.dense_4h_to_h.bias[3] += 1e-3
    changed.save_pretrained(other)
    assert load_snapshot(other).content_hash != base
    # The hash is over stored bytes: a float16 copy of the same model hashes differently from float32.
    half = tmp_path / "half"
    hf_model().half().save_pretrained(half)
    assert load_snapshot(half).content_hash != base


def test_pytorch_bin_checkpoint_and_missing_torch(saved, tmp_path, monkeypatch):
    hf, single, _ = saved
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(single / "config.json", d / "config.json")
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    # Old Pythia checkpoints carry recomputable buffers: they must be ignored.
    sd["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, d / "pytorch_model.bin")
    loaded = load_snapshot(d)
    assert loaded.content_hash == load_snapshot(single).content_hash
    np.testing.assert_allclose(loaded.model(jnp.asarray(IDS)), hf_logits(hf, IDS), atol=1e-4, rtol=0)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(CrossjaxError, match="need torch"):
        load_snapshot(d)


def test_save_hf_snapshot_round_trips_through_transformers(tmp_path):
    cfg = NeoXConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     rotary_pct=0.5, max_position_embeddings=32, use_parallel_residual=False)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(3))
    # Non-trivial LayerNorms and biases so a transposed or swapped tensor cannot go unnoticed.
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    nnx.update(model, jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    out = save_hf_snapshot(model, cfg, tmp_path / "snap", tokenizer_dir=tok)
    assert (out / "tokenizer.json").is_file() and not list(out.glob("*.tmp*"))  # no temporary file left
    ref = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    assert ref.config.use_parallel_residual is False
    assert ref.config.rope_parameters["partial_rotary_factor"] == 0.5
    ours = np.asarray(Runner(model).logits(IDS))
    np.testing.assert_allclose(hf_logits(ref, IDS), ours, atol=1e-4, rtol=0)
    back = load_snapshot(out)
    assert back.config == cfg and back.tokenizer_path == out
    pa, pb = params_of(model), params_of(back.model)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])
    # Saving transformers' reload again gives byte-identical tensors, hence the same hash.
    ref.save_pretrained(tmp_path / "resaved")
    assert load_snapshot(tmp_path / "resaved").content_hash == back.content_hash
    # An nnx.State saves the same as the module.
    save_hf_snapshot(nnx.state(model), cfg, tmp_path / "from_state")
    assert load_snapshot(tmp_path / "from_state").content_hash == back.content_hash


def test_save_rejects_wrong_config_and_writes_nothing(tmp_path):
    cfg = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    bigger = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64)
    with pytest.raises(CrossjaxError, match="missing"):
        save_hf_snapshot(model, bigger, tmp_path / "a")
    wider = NeoXConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=96)
    with pytest.raises(CrossjaxError, match="shape"):
        save_hf_snapshot(model, wider, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_onto_a_mesh_shards_big_matrices_and_matches(saved):
    hf, single, _ = saved
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [(r"mlp\.dense_h_to_4h\.weight$", P(None, "model")), (r"final_layer_norm", None)]
    loaded = load_snapshot(single, mesh=mesh, sharding_rules=rules)
    m = loaded.model
    emb = m.embed_in.embedding.get_value()
    assert emb.sharding.spec == P(("data", "model"), None)  # default: largest dim over all axes
    assert emb.addressable_shards[0].data.shape == (VOCAB // 8, 64)
    h4h = m.layers[0].mlp.dense_h_to_4h.kernel.get_value()
    assert h4h.sharding.spec == P(None, "model") and h4h.addressable_shards[0].data.shape == (64, 21)
    assert m.final_layer_norm.scale.get_value().sharding.is_fully_replicated
    plain = load_snapshot(single)
    assert loaded.content_hash == plain.content_hash
    np.testing.assert_allclose(Runner(m).logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)
    # An Explicit-axes mesh (jax's default) works too: weights are placed with Auto axes on the same devices.
    explicit = jax.make_mesh((8,), ("model",))
    m2 = load_snapshot(single, mesh=explicit).model
    assert m2.embed_in.embedding.get_value().sharding.spec == P(("model",), None)
    np.testing.assert_allclose(Runner(m2).logits(IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)
    with pytest.raises(CrossjaxError, match="does not divide"):
        load_snapshot(single, mesh=mesh, sharding_rules=[(r"dense_h_to_4h\.weight$", P(None, ("data", "model")))])
    with pytest.raises(CrossjaxError, match="more axes"):
        load_snapshot(single, mesh=mesh, sharding_rules=[(r"final_layer_norm\.weight$", P(None, "model"))])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_placed_bytes_is_what_each_device_holds_after_a_load(saved, dtype):
    """The memory plan's count of a loaded model against the arrays themselves: on one device every byte, on a mesh
    of 8 what the device with the most shards holds (the embeddings split, the 84-wide MLP not)."""
    _, single, _ = saved
    cfg = load_snapshot(single).config
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for devices, model in ((1, load_snapshot(single, dtype=dtype).model),
                           (8, load_snapshot(single, dtype=dtype, mesh=mesh).model)):
        per_device = {}
        for leaf in jax.tree.leaves(nnx.state(model)):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        assert len(per_device) == devices
        assert placed_bytes(cfg, dtype, devices) == max(per_device.values())
    # closed form: only embed_in and embed_out (1024 x 64 each) are large enough to split, 1/8 of each stays
    embeddings = 2 * VOCAB * 64 * jnp.dtype(dtype).itemsize
    assert placed_bytes(cfg, dtype, 8) == placed_bytes(cfg, dtype, 1) - embeddings * 7 // 8


def test_read_architecture_needs_only_config_json(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants
    _, single, _ = saved
    want = load_snapshot(single).config
    bare = tmp_path / "bare" / "step4"
    bare.mkdir(parents=True)
    shutil.copy(single / "config.json", bare / "config.json")          # no weights
    assert read_architecture(str(tmp_path / "bare" / "{snapshot}"), "step4") == want
    with pytest.raises(CrossjaxError, match="no config.json"):
        read_architecture(str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path / "cache", single)
    assert read_architecture("EleutherAI/pythia-tiny", "step4", cache_dir=tmp_path / "cache") == want
    with pytest.raises(CrossjaxError, match=r"EleutherAI/pythia-tiny@step8.*unreachable"):
        read_architecture("EleutherAI/pythia-tiny", "step8", cache_dir=tmp_path / "cache")


def test_bf16_load(saved):
    hf, single, _ = saved
    m = load_snapshot(single, dtype=jnp.bfloat16).model
    assert m.layers[0].attention.dense.kernel.get_value().dtype == jnp.bfloat16
    ref = hf_logits(hf, IDS)
    got = np.asarray(Runner(m).logits(IDS))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


# ------------------------------------------------------------------------------------------------ errors
def test_missing_and_incomplete_directories(saved, tmp_path):
    _, single, _ = saved
    with pytest.raises(CrossjaxError, match="does not exist"):
        resolve_snapshot(tmp_path / "nope")
    with pytest.raises(CrossjaxError, match="does not exist"):
        resolve_snapshot(str(tmp_path / "runs" / "{snapshot}"), "step4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossjaxError, match="no config.json"):
        resolve_snapshot(tmp_path / "empty")
    shutil.copy(single / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(CrossjaxError, match="no weights"):
        resolve_snapshot(tmp_path / "empty")
    with pytest.raises(CrossjaxError, match="no revisions"):
        resolve_snapshot(single, "step4")
    (tmp_path / "runs" / "step4").mkdir(parents=True)
    for f in single.iterdir():
        shutil.copy(f, tmp_path / "runs" / "step4" / f.name)
    assert resolve_snapshot(str(tmp_path / "runs" / "{snapshot}"), "step4") == tmp_path / "runs" / "step4"


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    _, single, _ = saved
    d = tmp_path / "deeper"
    shutil.copytree(single, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CrossjaxError, match="missing.*layers.2"):
        load_snapshot(d)
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(CrossjaxError, match=r"mlp.dense_4h_to_h.weight.*has shape \(64, 84\).*implies \(64, 96\)"):
        load_snapshot(d)


def _fake_hub_cache(cache, single, repo="EleutherAI/pythia-tiny", rev="step4"):
    """The on-disk layout huggingface_hub's cache uses: refs/<revision> -> snapshots/<commit>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "a" * 40
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(single / f, snap / f)
    (root / "refs").mkdir()
    (root / "refs" / rev).write_text(commit)
    return snap


def test_hub_snapshot_from_cache_offline_and_unreachable_hub(saved, tmp_path, monkeypatch):
    from huggingface_hub import constants
    _, single, _ = saved
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snap = _fake_hub_cache(tmp_path / "cache", single)
    assert resolve_snapshot("EleutherAI/pythia-tiny", "step4", cache_dir=tmp_path / "cache") == snap
    loaded = load_snapshot("EleutherAI/pythia-tiny", "step4", cache_dir=tmp_path / "cache")
    assert loaded.content_hash == load_snapshot(single).content_hash
    assert loaded.name == "EleutherAI/pythia-tiny@step4"
    with pytest.raises(CrossjaxError, match=r"EleutherAI/pythia-tiny@step8.*unreachable.*local directory"):
        resolve_snapshot("EleutherAI/pythia-tiny", "step8", cache_dir=tmp_path / "cache")
    with pytest.raises(CrossjaxError, match="unreachable"):
        resolve_snapshot("EleutherAI/pythia-160m", "step0", cache_dir=tmp_path / "cache")


def test_hub_connection_failure_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/"
                        "{filename}")
    with pytest.raises(CrossjaxError, match="Hub is unreachable"):
        resolve_snapshot("EleutherAI/pythia-160m", "step0", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ consistency
def test_duplicate_weights_and_architecture_and_tokenizer_checks(saved, tmp_path):
    hf, single, _ = saved
    a = load_snapshot(single)
    b_dir = tmp_path / "copy"
    shutil.copytree(single, b_dir)
    b = load_snapshot(b_dir)
    c_dir = tmp_path / "other"
    hf_model(seed=1).save_pretrained(c_dir)
    c = load_snapshot(c_dir)
    with pytest.raises(CrossjaxError, match=r"'step1000' and 'step2000' have identical weights"):
        check_snapshots_consistent({"step1000": a, "step2000": b, "step3000": c})
    assert check_snapshots_consistent({"step1000": a, "step2000": b, "step3000": c},
                                      allow_duplicates=True) == [["step1000", "step2000"]]
    assert check_snapshots_consistent([a, c]) == []
    d_dir = tmp_path / "seq"
    hf_model(use_parallel_residual=False).save_pretrained(d_dir)
    with pytest.raises(CrossjaxError, match="different architectures.*use_parallel_residual"):
        check_snapshots_consistent([a, load_snapshot(d_dir)])
    for d, vocab in ((b_dir, '{"a": 0}'), (c_dir, '{"b": 0}')):
        (d / "tokenizer.json").write_text(vocab)
    with pytest.raises(CrossjaxError, match="different tokenizers"):
        check_snapshots_consistent([load_snapshot(b_dir), load_snapshot(c_dir)])
