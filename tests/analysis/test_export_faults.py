"""crosscoder_export.load_exported (the analyses' entry point to trained weights) on malformed or damaged exports.

Every fault is injected into an export written by export_params; each must be a CrossjaxError naming the file and
how to export again, never a raw AttributeError/TypeError/KeyError/SafetensorError.
"""
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crossjax import crosscoder, crosscoder_export
from crossjax.errors import CrossjaxError

CFG = crosscoder.CrosscoderConfig(num_snapshots=2, d_model=3, num_features=4, activation="relu")
FIX = "rerun the training command with the same --config and --workdir"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=shape).astype(np.float32) for k, shape in crosscoder.param_shapes(CFG).items()}
    out = tmp_path_factory.mktemp("export") / "export"
    crosscoder_export.export_params(params, np.array([0.5, 2.0]), CFG, str(out))
    return out


@pytest.fixture
def copy(export, tmp_path):
    return shutil.copytree(export, tmp_path / "export")


def edit_config(d, change):
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(change(meta)))


def test_the_good_export_loads(export):
    params, scales, cfg = crosscoder_export.load_exported(export)  # a Path is accepted too
    assert cfg == CFG and scales.tolist() == [0.5, 2.0] and params["W_enc"].shape == (2, 3, 4)


@pytest.mark.parametrize("change,problem", [
    (lambda m: [m], "is not a version-1 crossjax.crosscoder config"),
    (lambda m: None, "is not a version-1"),
    (lambda m: dict(m, crosscoder=None), "is not a version-1"),
    (lambda m: dict(m, version=2), "is not a version-1"),
    (lambda m: dict(m, crosscoder={k: v for k, v in m["crosscoder"].items() if k != "d_model"}),
     r"the crosscoder section lacks \['d_model'\]"),
    (lambda m: dict(m, crosscoder=dict(m["crosscoder"], num_features="4")), r"num_features='4' must be an integer"),
    (lambda m: dict(m, crosscoder=dict(m["crosscoder"], tanh_k=-1.0)), r"tanh_k=-1.0 must be a finite number > 0"),
    (lambda m: dict(m, crosscoder=dict(m["crosscoder"], colour="red")), r"unknown crosscoder config keys"),
    (lambda m: dict(m, scales=None), r"has scales None; they must be 2 finite numbers > 0"),
    (lambda m: dict(m, scales=["a", 1.0]), r"has scales \['a', 1.0\]"),
    (lambda m: dict(m, scales=[0.0, 1.0]), r"has scales \[0.0, 1.0\]"),
    (lambda m: dict(m, scales=[-1.0, 1.0]), r"has scales \[-1.0, 1.0\]"),
    (lambda m: dict(m, scales=[1.0]), r"has scales \[1.0\]; they must be 2"),
    (lambda m: dict(m, scales=1.0), r"has scales 1.0"),
    (lambda m: dict(m, scales=[True, 1.0]), r"has scales \[True, 1.0\]"),
])
def test_a_malformed_config_is_named(copy, change, problem):
    edit_config(copy, change)
    with pytest.raises(CrossjaxError, match=problem) as e:
        crosscoder_export.load_exported(copy)
    assert str(copy / "config.json") in str(e.value) and FIX in str(e.value)


def test_config_json_that_is_not_json(copy):
    (copy / "config.json").write_bytes(b'{"format": "crossjax.cross')
    with pytest.raises(CrossjaxError, match="config.json is not valid JSON") as e:
        crosscoder_export.load_exported(copy)
    assert FIX in str(e.value)
    (copy / "config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CrossjaxError, match="not valid JSON"):
        crosscoder_export.load_exported(copy)


@pytest.mark.parametrize("damage,problem", [
    (lambda b: b[:-5], "is truncated"),
    (lambda b: b[:4], "is truncated"),
    (lambda b: struct.pack("<Q", 3) + b"xyz" + b[8:], "has a damaged header"),
])
def test_damaged_weights_are_named(copy, damage, problem):
    w = copy / "model.safetensors"
    w.write_bytes(damage(w.read_bytes()))
    with pytest.raises(CrossjaxError, match=problem) as e:
        crosscoder_export.load_exported(copy)
    assert str(w) in str(e.value) and FIX in str(e.value)


def test_weights_that_do_not_fit_the_config_are_named(copy):
    w = copy / "model.safetensors"
    good = load_file(str(w))
    for tensors, problem in ((dict(good, W_dec=good["W_dec"][:, :3]), r"'W_dec': \(2, 3, 3\)"),
                             ({k: v for k, v in good.items() if k != "b_enc"}, r"holds tensors"),
                             (dict(good, extra=np.zeros(1, np.float32)), r"'extra': \(1,\)"),
                             (dict(good, b_dec=good["b_dec"] * np.nan), r"non-finite values in \['b_dec'\]")):
        save_file(tensors, str(w))
        with pytest.raises(CrossjaxError, match=problem) as e:
            crosscoder_export.load_exported(copy)
        assert str(w) in str(e.value) and FIX in str(e.value)
    save_file(good, str(w))
    assert crosscoder_export.load_exported(copy)[2] == CFG
