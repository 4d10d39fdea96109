"""GPTNeoX in Flax NNX against transformers' PyTorch GPTNeoXForCausalLM (the reference), on tiny random models."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import torch  # noqa: F401  (the reference implementation: CI installs it, a missing torch fails these tests)
import transformers  # noqa: F401

from crossjax.errors import CrossjaxError  # noqa: E402
from crossjax.models import (  # noqa: E402
    GPTNeoX, NeoXConfig, Runner, abstract_model, count_params, hf_param_names, lm_loss, validate_context_len,
    validate_hook)
from crossjax.models.load import load_snapshot  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB, LAYERS, T = 96, 3, 12
TOL = 1e-4


def make_hf(tmp_path_factory, *, parallel, rotary_pct, seed=0):
    """A tiny random HF model with every parameter (LayerNorms and biases too) perturbed, saved to a tmp dir."""
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
        rotary_pct=rotary_pct, max_position_embeddings=64, use_parallel_residual=parallel)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp(f"hf_par{parallel}_rot{rotary_pct}")
    model.save_pretrained(path)
    return model, path


# Residual form and rotary fraction are independent code paths: three variants cover both options of each.
@pytest.fixture(scope="module", params=[(True, 0.25), (False, 0.25), (False, 1.0)],
                ids=["parallel-rot0.25", "sequential-rot0.25", "sequential-rot1"])
def pair(request, tmp_path_factory):
    parallel, rotary_pct = request.param
    hf, path = make_hf(tmp_path_factory, parallel=parallel, rotary_pct=rotary_pct)
    return hf, load_snapshot(path).model


@pytest.fixture(scope="module")
def parallel_model(tmp_path_factory):
    """One variant (parallel residual, rotary 0.25) for the paths that do not depend on the architecture."""
    _, path = make_hf(tmp_path_factory, parallel=True, rotary_pct=0.25)
    return load_snapshot(path).model


@pytest.fixture(scope="module")
def sequential_model(tmp_path_factory):
    _, path = make_hf(tmp_path_factory, parallel=False, rotary_pct=0.25)
    return load_snapshot(path).model


def tokens(batch=2, seq=T, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, seq)).astype(np.int32)


def hf_run(hf, ids, mask=None, labels=None):
    with torch.no_grad():
        return hf(torch.as_tensor(ids, dtype=torch.long),
                  attention_mask=None if mask is None else torch.as_tensor(mask),
                  labels=None if labels is None else torch.as_tensor(labels, dtype=torch.long),
                  output_hidden_states=True)


def test_logits_and_every_hidden_state_match_hf(pair):
    hf, model = pair
    ids = tokens()
    ref = hf_run(hf, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref.logits.numpy(), atol=TOL, rtol=0)
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(LAYERS)] + ["blocks.0.hook_resid_pre"]
    got = model.run_hooks(jnp.asarray(ids), hooks)
    assert len(ref.hidden_states) == LAYERS + 1
    np.testing.assert_allclose(got["blocks.0.hook_resid_pre"], ref.hidden_states[0].numpy(), atol=TOL, rtol=0)
    for i in range(LAYERS - 1):
        np.testing.assert_allclose(got[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1].numpy(),
                                   atol=TOL, rtol=0)
    # transformers' last hidden state is taken after final_layer_norm.
    last = model.final_layer_norm(got[f"blocks.{LAYERS - 1}.hook_resid_post"])
    np.testing.assert_allclose(last, ref.hidden_states[LAYERS].numpy(), atol=TOL, rtol=0)


def test_attn_and_mlp_outputs_match_torch_forward_hooks(pair):
    hf, model = pair
    ids = tokens(seed=2)
    seen = {}
    handles = []
    for i, layer in enumerate(hf.gpt_neox.layers):
        handles.append(layer.attention.register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(f"blocks.{i}.hook_attn_out", out[0].numpy())))
        handles.append(layer.mlp.register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(f"blocks.{i}.hook_mlp_out", out.numpy())))
    try:
        hf_run(hf, ids)
    finally:
        for h in handles:
            h.remove()
    got = model.run_hooks(jnp.asarray(ids), list(seen))
    for name, ref in seen.items():
        np.testing.assert_allclose(got[name], ref, atol=TOL, rtol=0, err_msg=name)


def test_forward_replacing_its_own_activation_is_the_plain_forward(pair):
    _, model = pair
    j = jnp.asarray(tokens(seed=3))
    plain = model(j)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out"]
    acts = model.run_hooks(j, hooks)
    for hook in hooks:
        np.testing.assert_allclose(model.forward_replacing(j, hook, acts[hook]), plain, atol=1e-5, rtol=0,
                                   err_msg=hook)


# hook -> (the HF module whose output it is, given the HF model; how a forward hook swaps that output for `new`)
REPLACED = {
    "blocks.0.hook_resid_post": (lambda hf: hf.gpt_neox.layers[0], lambda out, new: new),
    "blocks.1.hook_resid_pre": (lambda hf: hf.gpt_neox.layers[0], lambda out, new: new),
    "blocks.1.hook_attn_out": (lambda hf: hf.gpt_neox.layers[1].attention, lambda out, new: (new,) + out[1:]),
    "blocks.1.hook_mlp_out": (lambda hf: hf.gpt_neox.layers[1].mlp, lambda out, new: new),
}


@pytest.mark.parametrize("hook", list(REPLACED))
def test_forward_replacing_matches_torch_with_that_output_swapped(pair, hook):
    """A random replacement at each hook kind: PyTorch with a forward hook that swaps the module's output is the
    reference. At an attention or MLP output the residual that bypasses the sublayer must stay the model's own."""
    hf, model = pair
    ids = tokens(seed=3)
    new = np.random.default_rng(0).normal(size=ids.shape + (64,)).astype(np.float32)
    module, swap = REPLACED[hook]
    handle = module(hf).register_forward_hook(lambda mod, inp, out: swap(out, torch.as_tensor(new)))
    try:
        ref = hf_run(hf, ids).logits.numpy()
    finally:
        handle.remove()
    got = model.forward_replacing(jnp.asarray(ids), hook, jnp.asarray(new))
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert np.abs(ref - hf_run(hf, ids).logits.numpy()).max() > 0.1   # the swap changed the output


def test_lm_loss_matches_hf_loss_with_and_without_padding(pair):
    hf, model = pair
    ids = tokens(seed=4)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding on row 1
    ref = hf_run(hf, ids, labels=ids).loss.item()
    np.testing.assert_allclose(lm_loss(model(jnp.asarray(ids)), jnp.asarray(ids)), ref, rtol=1e-5)
    labels = np.where(mask == 1, ids, -100)
    ref_masked = hf_run(hf, ids, mask=mask, labels=labels).loss.item()
    got = lm_loss(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref_masked, rtol=1e-5)


def test_padded_batch_matches_unpadded_rows(pair):
    hf, model = pair
    ids = tokens(seed=5)
    n = 5  # row 1 holds n tokens then right padding; row 0 is full
    mask = np.ones_like(ids)
    mask[1, n:] = 0
    padded = np.where(mask == 1, ids, 0)
    hook = ["blocks.1.hook_resid_post"]
    got = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))
    got_hook = model.run_hooks(jnp.asarray(padded), hook, jnp.asarray(mask))[hook[0]]
    alone = np.asarray(Runner(model).logits(ids[1:, :n]))
    np.testing.assert_allclose(got[1, :n], alone[0], atol=TOL, rtol=0)
    alone_hook = Runner(model).hooks(ids[1:, :n], hook)[hook[0]]
    np.testing.assert_allclose(got_hook[1, :n], alone_hook[0], atol=TOL, rtol=0)
    ref = hf_run(hf, padded, mask=mask).logits.numpy()
    np.testing.assert_allclose(got[0], ref[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[1, :n], ref[1, :n], atol=TOL, rtol=0)


def test_jitted_functions_equal_eager(parallel_model):
    model = parallel_model
    ids = jnp.asarray(tokens(seed=6))
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_attn_out"]
    eager = model.run_hooks(ids, hooks)
    runner = Runner(model)
    jitted = runner.hooks(ids, hooks)
    assert set(jitted) == set(hooks)
    for h in hooks:
        np.testing.assert_allclose(jitted[h], eager[h], atol=1e-5, rtol=0)
    np.testing.assert_allclose(runner.logits(ids), model(ids), atol=1e-5, rtol=0)


def test_run_hooks_stops_at_the_deepest_hook():
    cfg = NeoXConfig(vocab_size=32, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32)
    graphdef, state = nnx.split(abstract_model(cfg))  # tracing needs shapes only
    ids = jnp.zeros((1, 4), jnp.int32)

    def dots(hooks):
        fn = lambda st: nnx.merge(graphdef, st).run_hooks(ids, hooks)  # noqa: E731
        return str(jax.make_jaxpr(fn)(state)).count("dot_general")

    per_block = 6  # QKV, scores, mix, dense, two MLP matmuls
    assert dots(["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"]) == 2 * per_block
    assert dots(["blocks.2.hook_resid_pre"]) == 2 * per_block
    assert dots(["blocks.0.hook_resid_pre"]) == 0
    assert dots(["blocks.3.hook_resid_post"]) == 4 * per_block


def test_bf16_compute_close_to_f32(sequential_model):
    model = sequential_model
    ids = jnp.asarray(tokens(seed=7))
    low_graph, _ = nnx.split(abstract_model(model.cfg, dtype=jnp.bfloat16))
    low = nnx.merge(low_graph, nnx.state(model))  # same float32 weights, bfloat16 matmul inputs
    hook = ["blocks.2.hook_resid_post"]
    a = Runner(model).hook(ids, hook[0])
    b = Runner(low).hook(ids, hook[0])
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert 0 < rel < 2e-2


def test_training_with_nnx_optimizer_lowers_loss_and_names_map_to_hf():
    cfg = NeoXConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                     max_position_embeddings=16)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {p for p, _, _ in hf_param_names(cfg)}
    assert paths == {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model))}  # nothing but parameters
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    ids = jnp.asarray(np.tile(np.arange(16) % 7, (4, 1)), jnp.int32)  # a periodic sequence is learnable

    @nnx.jit
    def step(model, opt, ids):
        loss, grads = nnx.value_and_grad(lambda m: lm_loss(m(ids), ids))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, ids)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------ config
def test_config_reads_old_and_new_keys_like_transformers():
    old = json.loads((FIXTURES / "pythia-160m" / "config.json").read_text())
    ours = NeoXConfig.from_hf_dict(old)
    ref = transformers.GPTNeoXConfig.from_dict(old)
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.intermediate_size, ours.vocab_size) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.intermediate_size, ref.vocab_size)
    assert ours.rotary_pct == ref.rope_parameters["partial_rotary_factor"] == 0.25
    assert ours.rotary_base == ref.rope_parameters["rope_theta"] == 10000
    assert ours.head_dim == 64 and ours.num_rotary_dims == 16
    new = ref.to_dict()  # transformers 5 layout: rope_parameters
    assert "rope_parameters" in new
    assert NeoXConfig.from_hf_dict(new) == ours
    # Our writer round-trips through transformers.
    back = transformers.GPTNeoXConfig.from_dict(ours.to_hf_dict())
    assert NeoXConfig.from_hf_dict(back.to_dict()) == ours


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope type"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_attention_heads": 7}, "divisible"),
])
def test_config_rejects_unsupported_settings(change, match):
    d = {**json.loads((FIXTURES / "pythia-160m" / "config.json").read_text()), **change}
    with pytest.raises(CrossjaxError, match=match):
        NeoXConfig.from_hf_dict(d)


@pytest.mark.parametrize("name, total", [("pythia-160m", 162_322_944), ("pythia-6.9b", 6_857_302_016)])
def test_published_pythia_configs_build_abstractly_with_published_counts(name, total):
    cfg = NeoXConfig.from_hf_dict(json.loads((FIXTURES / name / "config.json").read_text()))
    model = abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert count_params(model) == total
    qkv = model.layers[0].attention.query_key_value.kernel
    assert qkv.shape == (cfg.hidden_size, 3 * cfg.hidden_size) and qkv.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------ errors
def _four_layers():
    cfg = NeoXConfig(vocab_size=32, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
                     max_position_embeddings=8)
    return cfg, GPTNeoX(cfg, rngs=nnx.Rngs(0)), jnp.zeros((1, 4), jnp.int32)


# case -> (the call, given (cfg, model, ids) of a 4-layer model with 8 positions; the message it must raise)
HOOK_ERRORS = {
    "hook past the last layer": (lambda cfg, m, ids: m.run_hooks(ids, ["blocks.4.hook_resid_post"]), "4 layers"),
    "unknown hook": (lambda cfg, m, ids: m.run_hooks(ids, ["blocks.1.resid"]), "unknown hook"),
    "validate_hook past the last layer": (lambda cfg, m, ids: validate_hook(cfg, "blocks.9.hook_resid_pre"),
                                          "4 layers"),
    "a replacement of another shape": (lambda cfg, m, ids: m.forward_replacing(ids, "blocks.1.hook_attn_out",
                                                                               jnp.zeros((1, 5, 16))),
                                       r"must be \[batch, tokens, 16\] = \(1, 4, 16\)"),
    "forward_replacing past the last layer": (lambda cfg, m, ids: m.forward_replacing(
        ids, "blocks.4.hook_mlp_out", jnp.zeros((1, 4, 16))), "4 layers"),
    "context longer than the positions": (lambda cfg, m, ids: m(jnp.zeros((1, 9), jnp.int32)),
                                          "max_position_embeddings"),
    "validate_context_len": (lambda cfg, m, ids: validate_context_len(cfg, 2048), "max_position_embeddings"),
    "attention_mask of another shape": (lambda cfg, m, ids: m(ids, jnp.ones((1, 5))), "attention_mask"),
    "loss of one position": (lambda cfg, m, ids: lm_loss(jnp.zeros((1, 1, 32)), jnp.zeros((1, 1), jnp.int32)),
                             "T >= 2"),
}


@pytest.mark.parametrize("case", list(HOOK_ERRORS))
def test_hook_errors_name_the_depth(case):
    call, message = HOOK_ERRORS[case]
    with pytest.raises(CrossjaxError, match=message):
        call(*_four_layers())


def test_validate_hook_returns_the_depth_of_the_residual_stream():
    cfg, _, _ = _four_layers()
    assert validate_hook(cfg, "blocks.2.hook_resid_pre") == 2
    assert validate_hook(cfg, "blocks.2.hook_resid_post") == 3
