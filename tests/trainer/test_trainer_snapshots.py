"""The trainer on real model activations: tiny GPT-NeoX snapshots -> activation stage -> crosscoder, in one call."""
from pathlib import Path

import numpy as np
import pytest

import _activations_fixtures as fx
from _trainer_util import exported, summary
from crossjax import store as store_lib
from crossjax import pipeline
from crossjax.errors import CrossjaxError


def _config(root: Path, store: Path, **overrides):
    c = fx.make_config(root, store)
    c.data.source = "snapshots"
    c.data.d_model = 32
    c.crosscoder.num_features = 64
    c.crosscoder.init_norm = -1.0          # grid search on the first batch
    t = c.train
    t.batch_size, t.steps, t.lr, t.warmup_steps = 32, 10, 1e-3, 2   # 256 training rows: 8 steps an epoch
    t.log_every, t.checkpoint_every, t.heldout_blocks, t.progress = 5, 5, 2, False
    t.compute_dtype = "bfloat16"
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def test_snapshots_to_crosscoder_in_one_call(tmp_path):
    root = fx.make_root(tmp_path / "snaps")
    workdir = tmp_path / "run"
    out = pipeline.run(_config(root, tmp_path / "store"), str(workdir))

    st = store_lib.ActivationStore.open(str(tmp_path / "store"))
    assert st.is_complete() and st.meta.snapshots == ("step0", "step1", "step2") and st.meta.d_model == 32
    np.testing.assert_allclose(out.scales, st.scales)                 # estimated once, saved with the store
    assert out.steps == 10 and out.tokens == 320 and out.snapshots == ["step0", "step1", "step2"]
    assert out.heldout["rows"] == 44          # every held-out row: a batch of 32 and the 12 left over
    assert len(out.heldout["ev"]) == 3 and all(np.isfinite(out.heldout["ev"]))
    assert 0.1 <= out.init_norm <= 1.0 and "recovery" not in out.evals
    w = exported(workdir)
    assert w["W_dec"].shape == (3, 64, 32) and np.all(np.isfinite(w["W_dec"]))
    assert summary(workdir).heldout == out.heldout

    # another snapshot list in the same workdir is refused before anything runs
    with pytest.raises(CrossjaxError, match=r"model.snapshots"):
        pipeline.run(_config(root, tmp_path / "store", **{"model.snapshots": ["step0", "step2"]}), str(workdir))
    # the same list with the old store: the store's check names both lists
    c = _config(root, tmp_path / "store", **{"model.snapshots": ["step0", "step2"]})
    with pytest.raises(CrossjaxError, match=r"step0.*step2"):
        pipeline.run(c, str(tmp_path / "run2"))
    assert store_lib.ActivationStore.open(str(tmp_path / "store")).is_complete()


def test_spliced_in_loss_at_the_end_of_a_run(tmp_path):
    root = fx.make_root(tmp_path / "snaps")
    workdir = tmp_path / "run"
    c = _config(root, tmp_path / "store", **{"eval.spliced_tokens": 60})
    out = pipeline.run(c, str(workdir))
    spliced = out.evals["spliced"]
    assert sorted(spliced) == ["step0", "step1", "step2"]
    assert summary(workdir).evals["spliced"] == spliced
    for r in spliced.values():
        assert all(np.isfinite([r["clean_loss"], r["spliced_loss"], r["zero_ablated_loss"]]))
        recovered = (r["zero_ablated_loss"] - r["spliced_loss"]) / (r["zero_ablated_loss"] - r["clean_loss"])
        assert r["loss_recovered"] == pytest.approx(recovered, rel=1e-5)
    # second code path: the analysis API on the exported weights and the same contexts gives the same numbers
    from crossjax import tokens
    from crossjax.analysis.spliced import spliced_loss
    section = c.tokens
    section.split, section.num_tokens, section.seed = "heldout", 60, int(section.seed) + 1
    dirs = {n: root / n for n in ("step0", "step1", "step2")}
    direct = spliced_loss(dirs, str(workdir / "export"), c.model.hook,
                          tokens.contexts_for(section, tokens.load_tokenizer(dirs["step0"])))
    for name, r in direct.items():
        assert spliced[name]["spliced_loss"] == pytest.approx(r["spliced_loss"], rel=1e-6)
        assert spliced[name]["clean_loss"] == pytest.approx(r["clean_loss"], rel=1e-6)
