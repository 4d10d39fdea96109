"""Splice, attribution and curves on small random models: the splice is exact, attribution equals the actual
change of the metric when the metric is linear in the features, integrated gradients converges to the exact
difference on a nonlinear model, and the curves match their definitions."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _attribution_cases import crosscoder, id_task, snapshots
from crossjax import crosscoder as cc
from crossjax.attribution import attribute, curves, run, splice
from crossjax.errors import CrossjaxError
from crossjax.models import Runner

S = 3


def spliced(snaps, xc, hook, task, s):
    """splice.Splice of snapshot index s, the way run.analyze builds it."""
    c = splice.Crosscoder.of(xc)
    items = splice.snapshot_items(snaps)
    res = splice.collect_residuals(items, hook, task, c.cfg.d_model)
    h_clean, h_corr = c.encode(res.clean, task.valid), c.encode(res.corrupted, task.valid)
    return splice.Splice(items[s][1].model, hook, c, s, task, res.clean[s], res.corrupted[s], h_clean, h_corr), res


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_the_splice_leaves_the_output_unchanged(activation):
    snaps, task = snapshots(S), id_task()
    xc = crosscoder(S, activation=activation)
    hook = "blocks.0.hook_resid_post"
    for s, (name, loaded) in enumerate(snaps.items()):
        sp, res = spliced(snaps, xc, hook, task, s)
        runner = Runner(loaded.model)
        m = task.mask[..., None]
        for ids, f, err, base in ((task.clean, sp.f_clean, sp.err_clean, sp.base_clean),
                                  (task.corrupted, sp.f_corrupted, sp.err_corrupted, sp.base_corrupted)):
            plain = np.asarray(runner.logits(ids, task.mask))
            got = np.asarray(sp.logits(f, err, base))
            np.testing.assert_allclose(np.where(m, got, 0), np.where(m, plain, 0), rtol=1e-5, atol=1e-4)
            # not vacuous: without the features the output moves
            assert np.abs(np.where(m, np.asarray(sp.logits(jnp.zeros_like(f), err, base)) - plain, 0)).max() > 0.1
        # the features are the crosscoder's own activations of this snapshot
        params, scales, cfg = xc
        x = np.moveaxis(res.clean[:, task.valid], 0, 1) * scales[None, :, None]
        acts = np.asarray(cc.forward({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x), cfg)["acts"])
        want = acts[:, s] if acts.ndim == 3 else acts
        assert (want != 0).mean() > 0.05
        np.testing.assert_allclose(np.asarray(sp.f_clean)[task.valid], want, rtol=1e-5, atol=1e-5)
        assert sp.plain_clean.shape == (task.num_pairs,) and sp.metric(sp.f_clean)[0] == pytest.approx(
            float(sp.plain_clean.mean()), abs=1e-4)


def test_the_corrupted_metric_is_the_corrupted_run_at_a_residual_hook_and_a_patch_elsewhere():
    """The model runs on the clean prompts with the corrupted activation patched in at the hook: at a residual hook
    that is the corrupted run itself; at an attention output the clean residual bypasses the hook, so it is not."""
    snaps, task = snapshots(S), id_task(seed=3)
    loaded = snaps["step1"].model
    plain = np.asarray(splice._plain_metric(*nnx.split(loaded), task.corrupted, task.mask, task.last, task.right,
                                            task.wrong))
    at_resid, _ = spliced(snaps, crosscoder(S), "blocks.0.hook_resid_post", task, 1)
    np.testing.assert_allclose(at_resid.plain_corrupted, plain, rtol=1e-5, atol=1e-4)
    at_attn, res = spliced(snaps, crosscoder(S), "blocks.0.hook_attn_out", task, 1)
    assert np.abs(at_attn.plain_corrupted - plain).max() > 0.1
    # ... and it is the clean run with that sublayer's output swapped (the block recomputed by hand around it)
    ids, mask = jnp.asarray(task.clean), jnp.asarray(task.mask)
    block = loaded.layers[0]
    ctx = loaded._context(*ids.shape, mask)
    resid, _, _ = block(loaded.embed_in(ids), *ctx, attn_out=jnp.asarray(res.corrupted[1]))
    logits = loaded.forward_replacing(ids, "blocks.0.hook_resid_post", resid, mask)
    want = np.asarray(splice._readout(logits, task.last, task.right, task.wrong))
    np.testing.assert_allclose(at_attn.plain_corrupted, want, rtol=1e-5, atol=1e-4)


def _with_feature(f, i, value):
    return f.at[..., i].set(value)


# After the last block's residual, or its attention output (parallel residual: the MLP reads the block's input),
# only the final LayerNorm (made linear by its epsilon) and the unembedding follow.
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_attn_out"])
def test_attribution_is_the_actual_change_when_the_metric_is_linear_in_the_features(hook):
    snaps, task = snapshots(S, eps=1e10), id_task(seed=1)
    sp, _ = spliced(snaps, crosscoder(S), hook, task, 1)
    a = attribute.attribute(sp, ig_steps=1)
    m = sp.metric(sp.f_clean)[0]
    actual_ablate = np.array([m - sp.metric(_with_feature(sp.f_clean, i, 0.0))[0] for i in range(sp.num_features)])
    actual_patch = np.array([m - sp.metric(_with_feature(sp.f_clean, i, sp.f_corrupted[..., i]))[0]
                             for i in range(sp.num_features)])
    scale = np.abs(actual_ablate).max()
    assert scale > 0.1 and np.abs(actual_patch).max() > 0.1
    np.testing.assert_allclose(a.scores["attribution"], actual_ablate, atol=1e-4 * scale)
    np.testing.assert_allclose(a.scores["clean_minus_corrupted"], actual_patch, atol=1e-4 * scale)
    np.testing.assert_allclose(a.scores["integrated_gradients"], actual_patch, atol=1e-4 * scale)
    assert a.ig_gap == pytest.approx(0.0, abs=1e-4 * scale)
    assert a.per_position["attribution"].sum(axis=0) == pytest.approx(a.scores["attribution"])
    # the curves are then sums of attributions: ablating the top k removes exactly theirs
    c = curves.curves(sp, a.scores["attribution"], a.active, draws=2)
    order = np.argsort(-a.scores["attribution"], kind="stable")
    m_none = sp.metric(jnp.zeros_like(sp.f_clean))[0]
    for k, ablated, kept in zip(c["k"], c["ablate_top"], c["retain_top"]):
        assert ablated == pytest.approx(m - a.scores["attribution"][order[:k]].sum(), abs=1e-3 * scale)
        assert kept == pytest.approx(m_none + a.scores["attribution"][order[:k]].sum(), abs=1e-3 * scale)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"])
def test_integrated_gradients_converges_to_the_exact_difference_on_a_nonlinear_model(hook):
    snaps, task = snapshots(S), id_task(seed=2)
    sp, _ = spliced(snaps, crosscoder(S), hook, task, 2)
    exact = float(sp.plain_clean.mean() - sp.plain_corrupted.mean())
    assert abs(exact) > 0.05
    gaps = [abs(attribute.attribute(sp, ["integrated_gradients"], ig_steps=n).ig_gap) for n in (1, 4, 16, 64)]
    assert gaps[0] > 1e-2 * abs(exact)                       # nonlinear: one step is far off
    assert gaps[1] < gaps[0] and gaps[2] < gaps[1] and gaps[3] <= gaps[2] + 1e-5
    assert gaps[3] < 1e-3 * abs(exact)
    # and attribution patching is only a first-order estimate here (the linear test above could fail)
    a = attribute.attribute(sp, ["attribution"])
    m = sp.metric(sp.f_clean)[0]
    actual = np.array([m - sp.metric(_with_feature(sp.f_clean, i, 0.0))[0] for i in range(sp.num_features)])
    assert np.abs(a.scores["attribution"] - actual).max() > 1e-3


def test_curves_grid_random_draws_and_their_ends():
    assert curves.log_grid(0) == [] and curves.log_grid(5) == [1, 2, 4, 5] and curves.log_grid(8) == [1, 2, 4, 8]
    assert curves.log_grid(100, max_k=10) == [1, 2, 4, 8, 10]
    snaps, task = snapshots(S), id_task()
    sp, _ = spliced(snaps, crosscoder(S), "blocks.0.hook_resid_post", task, 0)
    a = attribute.attribute(sp, ["attribution"])
    c = curves.curves(sp, a.scores["attribution"], a.active, draws=3, seed=5)
    assert c == curves.curves(sp, a.scores["attribution"], a.active, draws=3, seed=5)      # seeded
    assert c["k"][-1] == int(a.active.sum()) == c["active_features"]
    # all active features kept: the spliced metric; all ablated: the reconstruction is b_dec + the error term
    assert c["retain_random"][-1] == pytest.approx(c["metric_spliced"], abs=1e-4)
    assert c["ablate_random"][-1] == pytest.approx(sp.metric(jnp.zeros_like(sp.f_clean))[0], abs=1e-4)
    assert c["ablate_random_std"][-1] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(CrossjaxError, match="draws=0"):
        curves.curves(sp, a.scores["attribution"], a.active, draws=0)


def test_analyze_names_what_does_not_fit():
    snaps, task = snapshots(S), id_task()
    hook = "blocks.0.hook_resid_post"
    with pytest.raises(CrossjaxError, match="covers 2 snapshots but 3 were given"):
        run.analyze(snaps, crosscoder(2), hook, task)
    with pytest.raises(CrossjaxError, match=r"\['step9'\] to analyze are not among"):
        run.analyze(snaps, crosscoder(S), hook, task, targets=["step9"])
    with pytest.raises(CrossjaxError, match="unknown hook"):
        run.analyze(snaps, crosscoder(S), "blocks.0.hook_mlp", task)
    sp, _ = spliced(snaps, crosscoder(S), hook, task, 0)
    with pytest.raises(CrossjaxError, match="choose among"):
        attribute.attribute(sp, ["patching"])
    with pytest.raises(CrossjaxError, match="ig_steps=0"):
        attribute.attribute(sp, ig_steps=0)
    out = run.analyze(snaps, crosscoder(S), hook, task, targets=["step1"], ig_steps=2, max_k=4)
    assert list(out) == ["step1"] and set(out["step1"]["curves"]) == set(attribute.METHODS)
    assert out["step1"]["curves"]["attribution"]["k"] == [1, 2, 4]
