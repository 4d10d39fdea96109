"""The exported snapshot slice loads with the real sae-lens package, and its encode/decode equal crossjax's
single-snapshot computation; the encoder refit raises its EV."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sae_lens import SAE

from _trainer_util import tiny_config
from crossjax import crosscoder, crosscoder_export, export_saelens, pipeline
from crossjax import store as store_lib
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.errors import CrossjaxError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("saelens")
    c = tiny_config(root / "store", **{"train.steps": 60, "train.checkpoint_every": 0})
    c.evals = "heldout"
    return pipeline.run(c, str(root / "run"))


def test_sae_lens_loads_the_slice_and_computes_what_crossjax_computes(run, tmp_path):
    out = export_saelens.export(run.workdir, "planted_2", str(tmp_path / "sae"))
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    assert sae.cfg.d_in == 16 and sae.cfg.d_sae == 64 and sae.cfg.metadata.hook_name == "planted"
    store = store_lib.ActivationStore.open(run.store)
    x = store.read_rows(*store.block_range(store.meta.num_blocks - 1))[:, 2].astype(np.float32)    # raw [N, D]
    # crossjax's single-snapshot computation: the S=1 slice of the crosscoder on normalised rows of snapshot 2
    params, scales, cfg = crosscoder_export.load_exported(run.export)
    one = CrosscoderConfig(**{**cfg.to_dict(), "num_snapshots": 1})
    p1 = {k: jnp.asarray(v[2:3] if k in ("W_enc", "W_dec", "b_dec") else v) for k, v in params.items()}
    ref = crosscoder.forward(p1, crosscoder.normalize(jnp.asarray(x[:, None]), scales[2:3]), one)
    with torch.no_grad():
        acts = sae.encode(torch.from_numpy(x))
        xhat = sae.decode(acts)
    ref_acts = np.asarray(ref["acts"][:, 0])
    agree = (acts.numpy() > 0) == (ref_acts > 0)
    assert agree.mean() > 0.9999                      # the same gates, up to rounding right at a threshold
    np.testing.assert_allclose(acts.numpy()[agree.all(1)], ref_acts[agree.all(1)], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xhat.numpy()[agree.all(1)], np.asarray(ref["xhat"][:, 0] / scales[2])[agree.all(1)],
                               rtol=1e-4, atol=1e-4)
    saved = json.load(open(tmp_path / "sae" / "crossjax_export.json"))
    assert saved == out and out["snapshot"] == "planted_2" and out["heldout_rows"] == 512
    assert out["crosscoder_ev_on_snapshot"] == run.heldout["ev"][2]
    assert out["exported_ev"] < out["crosscoder_ev_on_snapshot"]        # it sees one snapshot, not four


def test_refit_of_the_encoder_raises_the_single_snapshot_ev(run, tmp_path):
    out = export_saelens.export(run.workdir, 2, str(tmp_path / "refit"), refit_steps=150)
    assert out["refit_ev"] > out["exported_ev"] + 0.01
    sae = SAE.load_from_disk(str(tmp_path / "refit"))
    assert sae.cfg.d_sae == 64


def test_bad_arguments(run, tmp_path):
    with pytest.raises(CrossjaxError, match="not one of the snapshots"):
        export_saelens.export(run.workdir, "step9", str(tmp_path / "x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(CrossjaxError, match="is a file"):
        export_saelens.export(run.workdir, 0, str(tmp_path / "file"))


def test_command_line(run, tmp_path):
    import subprocess
    import sys

    from _procs import child_env
    from _trainer_util import ROOT
    cmd = [sys.executable, "-m", "crossjax.export_saelens", f"--workdir={run.workdir}", "--out", str(tmp_path / "o")]
    ok = subprocess.run(cmd + ["--snapshot=planted_1"], cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "SAELens SAE of planted_1" in ok.stdout and (tmp_path / "o" / "cfg.json").exists()
    bad = subprocess.run(cmd + ["--snapshot=nope"], cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not one of the snapshots" in bad.stderr and "Traceback" not in bad.stderr
