"""The hash-only reader and damaged snapshot files: truncated, bad header, flipped bits, broken index or config."""
import json
import re
import shutil
import struct

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from crossjax.errors import CrossjaxError
from crossjax.models import snapshot_files
from crossjax.models.load import inspect_snapshot, load_snapshot


def hf_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              rotary_pct=0.25, max_position_embeddings=16)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**kw, **overrides})).eval()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    hf_model().save_pretrained(d)
    return d


def bin_snapshot(model, single, d):
    """A pytorch_model.bin checkpoint (what older transformers saved) of `model`."""
    d.mkdir()
    shutil.copy(single / "config.json", d / "config.json")
    torch.save({("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in model.state_dict().items()},
               d / "pytorch_model.bin")
    return d


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------------ the hash
@pytest.mark.parametrize("layout", ["single", "sharded", "bin", "bf16", "tied", "buffers"])
def test_weights_hash_equals_the_hash_of_a_full_load(single, tmp_path, layout):
    model, d = hf_model(tie_word_embeddings=layout == "tied"), tmp_path / layout
    if layout == "bf16":
        model = model.to(torch.bfloat16)
    if layout == "bin":
        bin_snapshot(model, single, d)
    else:
        model.save_pretrained(d, max_shard_size="20KB" if layout == "sharded" else "5GB")
    if layout == "buffers":  # an old checkpoint: recomputed buffers and the in-memory lm_head name
        tensors = load_file(str(d / "model.safetensors"))
        tensors["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
        tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
        save_file(tensors, str(d / "model.safetensors"))
    assert (d / "model.safetensors.index.json").is_file() == (layout == "sharded")
    full = load_snapshot(d)
    assert snapshot_files.weights_hash(d) == full.content_hash
    seen = inspect_snapshot(d)
    assert seen.model is None and seen.content_hash == full.content_hash and seen.config == full.config


def test_a_flipped_bit_changes_the_hash_but_not_the_file_format(single, tmp_path):
    d = copy(single, tmp_path / "flipped")
    base = snapshot_files.weights_hash(single)
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-100] ^= 0x01  # inside the last tensor's data
    (d / "model.safetensors").write_bytes(bytes(raw))
    assert snapshot_files.weights_hash(d) != base
    assert load_snapshot(d).content_hash == snapshot_files.weights_hash(d)  # still readable: only a hash sees it


def test_the_hash_reader_builds_no_model(single, monkeypatch):
    from crossjax.models import load
    monkeypatch.setattr(load, "abstract_model", lambda *a, **k: pytest.fail("a model was built"))
    assert len(inspect_snapshot(single).content_hash) == 64


# ------------------------------------------------------------------------------------------------ damaged files
def truncated(single, tmp_path, keep):
    d = copy(single, tmp_path / f"cut{keep}")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    return d


@pytest.mark.parametrize("keep,problem", [(-10, "is truncated"), (3, "is truncated"), (40, "truncated or not "
                                                                                          "safetensors")])
def test_a_truncated_safetensors_file_is_named(single, tmp_path, keep, problem):
    d = truncated(single, tmp_path, keep)
    for read in (snapshot_files.weights_hash, load_snapshot, inspect_snapshot):
        with pytest.raises(CrossjaxError, match=problem) as e:
            read(d)
        assert str(d / "model.safetensors") in str(e.value) and "download the snapshot again" in str(e.value)


def test_a_damaged_header_is_named(single, tmp_path):
    d = copy(single, tmp_path / "header")
    raw = bytearray((d / "model.safetensors").read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].decode()
    cases = {
        "not JSON": header.replace("{", "[", 1),
        "not a JSON object": json.dumps([1]).ljust(n),
        "does not start where": re.sub(r'"data_offsets":\[0,(\d+)\]', lambda m: f'"data_offsets":[4,{int(m[1]) + 4}]',
                                       header, count=1),
        "dtype F8": header.replace('"F32"', '"F8"', 1),
    }
    for problem, text in cases.items():
        body = text.encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
        with pytest.raises(CrossjaxError, match=problem) as e:
            load_snapshot(d)
        assert str(d / "model.safetensors") in str(e.value)
        with pytest.raises(CrossjaxError, match=problem):
            snapshot_files.weights_hash(d)


def test_a_broken_index_config_or_bin_is_named(single, tmp_path):
    sharded = tmp_path / "sharded"
    hf_model().save_pretrained(sharded, max_shard_size="20KB")
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CrossjaxError, match="index.json is not a weight index"):
        snapshot_files.weights_hash(sharded)
    d = copy(single, tmp_path / "config")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CrossjaxError, match=r"config.json holds a JSON list"):
        load_snapshot(d)
    (d / "config.json").write_text("{")
    with pytest.raises(CrossjaxError, match=r"config.json is not valid JSON"):
        inspect_snapshot(d)
    (d / "config.json").write_text(json.dumps(dict(json.loads((single / "config.json").read_text()),
                                                   vocab_size="many")))
    with pytest.raises(CrossjaxError, match=r"config.json is not a GPT-NeoX config"):
        snapshot_files.weights_hash(d)
    b = bin_snapshot(hf_model(), single, tmp_path / "bin")
    (b / "pytorch_model.bin").write_bytes((b / "pytorch_model.bin").read_bytes()[:500])
    with pytest.raises(CrossjaxError, match="pytorch_model.bin cannot be read by torch"):
        snapshot_files.weights_hash(b)
