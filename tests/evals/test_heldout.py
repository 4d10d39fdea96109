"""Held-out evaluation counts every held-out row: the streamed, sharded, batched figures equal one computation
over all held-out rows at once (metrics.explained_variance on crosscoder.forward), whatever the batch size."""
import jax.numpy as jnp
import numpy as np
import pytest

from _trainer_util import mesh_overrides, tiny_config
from crossjax import crosscoder, crosscoder_export, metrics, pipeline
from crossjax import store as store_lib


@pytest.mark.parametrize("eval_batch, mesh", [(296, (2, 2, 2)), (512, (1, 1, 1)), (64, (8, 1, 1))])
def test_heldout_figures_cover_every_row_and_match_one_batch(tmp_path_factory, eval_batch, mesh):
    store_path = tmp_path_factory.getbasetemp() / "heldout_store"       # one planted store for the three cases
    c = tiny_config(store_path, **mesh_overrides(*mesh), **{"train.steps": 3, "train.checkpoint_every": 0,
                                                             "train.heldout_blocks": 2, "eval.batch_size": eval_batch})
    c.evals = "heldout"
    out = pipeline.run(c, str(tmp_path_factory.mktemp("run")))
    got = out.evals["heldout"]

    store = store_lib.ActivationStore.open(str(store_path))
    lo, hi = store.block_range(store.meta.num_blocks - 2)[0], store.meta.num_rows
    assert got["rows"] == hi - lo == 1024                  # 1024 rows: 296 and 64 leave a remainder, 512 none
    params, scales, cfg = crosscoder_export.load_exported(out.export)
    x = crosscoder.normalize(jnp.asarray(store.read_rows(lo, hi), jnp.float32), scales)
    ref = crosscoder.forward({k: jnp.asarray(v) for k, v in params.items()}, x, cfg)
    np.testing.assert_allclose(got["ev"], metrics.explained_variance(x, ref["xhat"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["ev_legacy"], metrics.legacy_explained_variance(x, ref["xhat"]), rtol=1e-5,
                               atol=1e-6)
    active = np.asarray(ref["acts"]) > 0                    # [B, S, F]: JumpReLU gates per snapshot
    np.testing.assert_allclose(got["l0"], active.sum(-1).mean(0), rtol=1e-6)
    assert got["dead_frac"] == pytest.approx(float(np.mean(~active.any(axis=(0, 1)))))
    sq = np.sum((np.asarray(x) - np.asarray(ref["xhat"])) ** 2, axis=-1)
    np.testing.assert_allclose(got["mse"], sq.mean(0), rtol=1e-5)


def test_max_batches_limits_the_evaluation_to_whole_batches(tmp_path):
    c = tiny_config(tmp_path / "store", **{"train.steps": 2, "train.checkpoint_every": 0,
                                          "train.heldout_blocks": 2, "eval.batch_size": 296, "eval.max_batches": 2})
    c.evals = "heldout"
    assert pipeline.run(c, str(tmp_path / "run")).evals["heldout"]["rows"] == 592
