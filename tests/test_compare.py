"""crossjax.compare: per-snapshot SAEs beside the crosscoder, on the same store, with the same code."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _trainer_util import experiment
from crossjax import compare, crosscoder, data, trainer
from crossjax.errors import CrossjaxError
from crossjax.store import ActivationStore


def test_compare_matches_the_crosscoder_and_direct_sae_runs(tmp_path):
    c = experiment("synthetic", "tiny")
    work = tmp_path / "run"
    result = compare.compare(c, str(work), ["planted_1", "planted_3"])
    cc = json.loads((work / "summary.json").read_text())
    assert result["crosscoder"]["ev"] == [cc["eval"]["ev"][1], cc["eval"]["ev"][3]]
    assert result["crosscoder"]["l0"] == [cc["eval"]["l0"][1], cc["eval"]["l0"][3]]
    assert json.loads((work / "compare.json").read_text()) == result
    # every SAE trained on the crosscoder's store and wrote no store of its own
    for sae_dir in result["sae_workdirs"]:
        assert not os.path.exists(os.path.join(sae_dir, "store"))
        summary = json.loads(open(os.path.join(sae_dir, "summary.json")).read())
        assert summary["store"] == cc["store"]
        assert len(summary["snapshots"]) == 1
        _, _, cfg = crosscoder.load_exported(summary["export"])
        assert cfg.num_snapshots == 1
    # second code path: the same SAE trained directly with data.snapshots gives the same figures
    direct = trainer.run(compare.sae_config(c, str(work), "planted_3"), str(tmp_path / "direct"))
    assert direct["eval"]["ev"][0] == pytest.approx(result["sae"]["ev"][1], rel=1e-6)
    assert direct["eval"]["l0"][0] == pytest.approx(result["sae"]["l0"][1], rel=1e-6)
    assert "| planted_3 |" in compare.table(result)
    with pytest.raises(CrossjaxError, match="was not trained on"):
        compare.compare(c, str(work), ["step7"])


def test_a_snapshot_subset_delivers_exactly_those_columns(tmp_path):
    c = experiment("synthetic", "tiny")
    trainer.run(c, str(tmp_path))  # writes the planted store
    store = ActivationStore.open(str(tmp_path / "store"))
    full = data.make_loader(store, global_batch=64, seed=3, sharding=None, num_epochs=1)
    sub = data.make_loader(store, global_batch=64, seed=3, sharding=None, num_epochs=1, snapshots=[3, 1])
    for a, b in zip(full, sub):
        np.testing.assert_array_equal(b["acts"], a["acts"][:, [3, 1]])
    full.close(), sub.close()
    with pytest.raises(CrossjaxError, match="distinct indices"):
        data.make_loader(store, global_batch=64, seed=3, sharding=None, snapshots=[4])
    c.data.snapshots = "planted_1,nope"
    with pytest.raises(CrossjaxError, match="unknown: \\['nope'\\]"):
        trainer.selected_snapshots(c, store)


def test_command_prints_the_table(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "crossjax.compare", f"--config={root}/experiments/synthetic.py:tiny",
         f"--workdir={tmp_path}", "--snapshots=planted_0"],
        capture_output=True, text=True, timeout=300, cwd=root,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| snapshot | crosscoder EV | SAE EV | crosscoder L0 | SAE L0 |" in proc.stdout
    assert "| planted_0 |" in proc.stdout
