"""A cached suite's snapshots are verified against the weight hashes recorded when they were written.

Faults injected into a copy of one micro suite: a flipped bit, a truncated file, a damaged header, a DONE.json
from a crossjax that recorded no hashes. Each must be refused (naming the file and the fix) before any snapshot
is used, and the fix must give back the same bits.
"""
import json
import shutil
import struct

import pytest

from crossjax import configs
from crossjax.errors import CrossjaxError
from crossjax.models import load as model_load
from crossjax.models import snapshot_files
from crossjax.suite import pretrain, training

SNAP = "step8"


def micro(path):
    section = configs.suite_config("micro")
    section.dir, section.progress = str(path), False
    return section


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite") / "micro"
    pretrain.ensure_suite(micro(root))
    return root


@pytest.fixture
def suite(built, tmp_path):
    """A private copy of the built suite to damage."""
    return shutil.copytree(built, tmp_path / "micro")


def weights(root, name=SNAP):
    return root / name / "model.safetensors"


def files_of(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_the_build_records_every_snapshot_hash(built):
    names = pretrain.snapshot_names(micro(built))
    done = json.loads((built / "DONE.json").read_text())
    want = {n: snapshot_files.weights_hash(built / n) for n in names}
    assert done[training.WEIGHTS_KEY] == want
    assert {r["name"]: r[training.WEIGHTS_KEY] for r in pretrain.read_losses(built)["snapshots"]} == want
    assert want[SNAP] == model_load.load_snapshot(built / SNAP).content_hash  # the hash activations record
    assert len(set(want.values())) == len(names)


def test_a_flipped_bit_is_refused_and_the_fix_restores_the_same_bits(suite, built):
    raw = bytearray(weights(suite).read_bytes())
    raw[-7] ^= 0x10
    weights(suite).write_bytes(bytes(raw))
    before = files_of(suite)
    with pytest.raises(CrossjaxError, match="does not hold the weights the suite recorded for step8") as e:
        pretrain.ensure_suite(micro(suite))
    msg = str(e.value)
    assert str(weights(suite)) in msg and f"remove {suite / SNAP} and run the same command again" in msg
    assert files_of(suite) == before  # the refusal touches nothing
    # the fix as the message gives it
    shutil.rmtree(suite / SNAP)
    assert pretrain.ensure_suite(micro(suite)) == suite
    assert weights(suite).read_bytes() == weights(built).read_bytes()
    assert files_of(suite).keys() == files_of(built).keys()
    pretrain.ensure_suite(micro(suite))  # and it verifies again


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_snapshot_file_is_named_with_the_fix(suite, damage):
    raw = weights(suite).read_bytes()
    if damage == "truncated":
        weights(suite).write_bytes(raw[: len(raw) // 2])
    else:
        weights(suite).write_bytes(struct.pack("<Q", 10 ** 6) + raw[8:])
    with pytest.raises(CrossjaxError, match="the suite snapshot step8 is damaged") as e:
        pretrain.ensure_suite(micro(suite))
    assert str(weights(suite)) in str(e.value) and "truncated" in str(e.value)
    assert f"remove {suite / SNAP} and run the same command again" in str(e.value)


def test_a_suite_finished_without_hashes_records_them_on_first_reuse(suite, built):
    done = json.loads((suite / "DONE.json").read_text())
    recorded = done.pop(training.WEIGHTS_KEY)
    (suite / "DONE.json").write_text(json.dumps(done))
    pretrain.ensure_suite(micro(suite))
    assert json.loads((suite / "DONE.json").read_text()) == {**done, training.WEIGHTS_KEY: recorded}
    raw = bytearray(weights(suite).read_bytes())
    raw[-7] ^= 0x01
    weights(suite).write_bytes(bytes(raw))
    with pytest.raises(CrossjaxError, match="does not hold the weights"):  # from now on they are verified
        pretrain.ensure_suite(micro(suite))


def test_reuse_streams_the_hashes_without_building_a_model(built, monkeypatch):
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a complete suite must not be trained"))
    monkeypatch.setattr(model_load, "load_snapshot", lambda *a, **k: pytest.fail("no model is loaded to verify"))
    seen = []
    real = snapshot_files.weights_hash
    monkeypatch.setattr(snapshot_files, "weights_hash", lambda p: seen.append(p.name) or real(p))
    assert pretrain.ensure_suite(micro(built)) == built
    assert seen == pretrain.snapshot_names(micro(built))  # every snapshot, each once
