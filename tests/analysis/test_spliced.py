"""Spliced-in loss on tiny transformers-made GPT-NeoX snapshots, checked against PyTorch forwards with hooks."""
import types

import numpy as np
import pytest

import torch  # noqa: F401  (the reference: CI installs it, a missing torch fails these tests)
import transformers  # noqa: F401

from crossjax import crosscoder  # noqa: E402
from crossjax import crosscoder_export
from crossjax.analysis.spliced import spliced_loss  # noqa: E402
from crossjax.errors import CrossjaxError  # noqa: E402
from crossjax.models.load import load_snapshot  # noqa: E402

VOCAB, D, LAYERS, T = 96, 32, 2, 12
SCALES = np.array([0.5, 3.0], np.float32)  # unequal, so that a missing or swapped division shows
LENGTHS = [12, 9, 12, 5, 7]  # real tokens per context; the rest is right padding


def hf_model(seed, parallel):
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, intermediate_size=64, rotary_pct=0.5,
                                     max_position_embeddings=32, use_parallel_residual=parallel)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """Two 'snapshots' (different weights, same architecture), saved as Hugging Face directories."""
    out = []
    for seed in (0, 1):
        model = hf_model(seed, parallel=True)
        path = tmp_path_factory.mktemp(f"step{seed}")
        model.save_pretrained(path)
        out.append((model, path))
    return out


@pytest.fixture(scope="module")
def contexts():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(len(LENGTHS), T)).astype(np.int32)
    real = np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]
    ids[~real] = 0  # padding
    ids[:, 0] = 0  # BOS
    valid = real.copy()
    valid[:, 0] = False  # BOS is not stored, so not spliced
    valid[1, 4] = False  # a special token inside a context
    return ids, valid, real


def identity_crosscoder(shift=64.0):
    """ReLU crosscoder with F = S*D whose reconstruction equals its input wherever x + shift > 0:
    h[s*D + d] = x[s, d] + shift, xhat[s] = relu(h)[s-block] - shift."""
    S, F = 2, 2 * D
    w_enc = np.zeros((S, D, F), np.float32)
    w_dec = np.zeros((S, F, D), np.float32)
    for s in range(S):
        w_enc[s, :, s * D:(s + 1) * D] = np.eye(D)
        w_dec[s, s * D:(s + 1) * D, :] = np.eye(D)
    params = {"W_enc": w_enc, "b_enc": np.full(F, shift, np.float32), "W_dec": w_dec,
              "b_dec": np.full((S, D), -shift, np.float32), "log_threshold": np.zeros(F, np.float32)}
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation="relu")
    return params, SCALES, cfg


def torch_loss(model, ids, real, replace=None, layer=0, sublayer=None):
    """Mean next-token loss over pairs inside `real`, optionally with layer `layer`'s output (or its "attention" or
    "mlp" sublayer's) replaced by replace(output) through a PyTorch forward hook."""
    handle = None
    if replace is not None:
        module = model.gpt_neox.layers[layer]
        if sublayer == "attention":   # returns (output, weights)
            handle = module.attention.register_forward_hook(lambda mod, args, out: (replace(out[0]),) + out[1:])
        else:
            module = module.mlp if sublayer == "mlp" else module
            handle = module.register_forward_hook(lambda mod, args, out: replace(out))
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(real, dtype=torch.long)).logits
    finally:
        if handle is not None:
            handle.remove()
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, torch.as_tensor(ids[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()
    pairs = real[:, 1:] & real[:, :-1]
    return float(nll[pairs].mean())


def hidden(model, ids, real, layer=0):
    with torch.no_grad():
        out = model(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(real, dtype=torch.long),
                    output_hidden_states=True)
    return out.hidden_states[layer + 1]


def test_identity_crosscoder_gives_the_clean_loss_and_zero_ablation_matches_torch(snapshots, contexts):
    ids, valid, real = contexts
    dirs = [p for _, p in snapshots]
    out = spliced_loss(dirs, identity_crosscoder(), "blocks.0.hook_resid_post", (ids, valid), batch_size=2,
                       rows_per_batch=7)
    assert list(out) == [p.name for p in dirs]
    pairs = int((real[:, 1:] & real[:, :-1]).sum())
    mask = torch.as_tensor(valid)
    for (model, path), r in zip(snapshots, out.values()):
        assert r["pairs"] == pairs
        clean = torch_loss(model, ids, real)
        zero = torch_loss(model, ids, real, lambda h: torch.where(mask[..., None], 0.0, h))
        np.testing.assert_allclose(r["clean_loss"], clean, atol=2e-5, rtol=0)
        np.testing.assert_allclose(r["spliced_loss"], clean, atol=2e-5, rtol=0)
        np.testing.assert_allclose(r["zero_ablated_loss"], zero, atol=2e-5, rtol=0)
        gap = abs(zero - clean)
        assert gap > 1e-3  # the ablation matters, so loss_recovered is well defined
        np.testing.assert_allclose(r["loss_recovered"], 1.0, atol=2e-5 / gap)
        np.testing.assert_allclose(r["loss_recovered"], (r["zero_ablated_loss"] - r["spliced_loss"]) / (
            r["zero_ablated_loss"] - r["clean_loss"]), rtol=1e-12)


def test_swapped_reconstruction_splices_the_other_snapshot(snapshots, contexts):
    """A reconstruction returning snapshot 1's residual for snapshot 0 (and back) must give the loss of model 0
    run on model 1's residual at the valid positions: this pins the snapshot order and the per-snapshot scales."""
    ids, valid, real = contexts
    loaded = [load_snapshot(p) for _, p in snapshots]

    def swap(x):  # x = resid * scales; return xhat with xhat / scales = the other snapshot's resid
        return x[:, ::-1] * (SCALES / SCALES[::-1])[None, :, None]

    out = spliced_loss({"a": loaded[0], "b": loaded[1]}, None, "blocks.0.hook_resid_post", (ids, valid),
                       reconstruct=swap, scales=SCALES, batch_size=2)
    mask = torch.as_tensor(valid)[..., None]
    for (model, _), (other, _), name in ((snapshots[0], snapshots[1], "a"), (snapshots[1], snapshots[0], "b")):
        theirs = hidden(other, ids, real)
        want = torch_loss(model, ids, real, lambda h: torch.where(mask, theirs, h))
        np.testing.assert_allclose(out[name]["spliced_loss"], want, atol=2e-5, rtol=0)
    # a reconstruction of zeros is the zero ablation, exactly
    zeros = spliced_loss(loaded, None, "blocks.0.hook_resid_post", (ids, valid), reconstruct=np.zeros_like,
                         batch_size=2)
    for r in zeros.values():
        assert r["spliced_loss"] == r["zero_ablated_loss"] and r["loss_recovered"] == 0.0


def test_resid_pre_hook_and_sequential_residual(tmp_path, contexts):
    ids, valid, real = contexts
    models = [hf_model(seed, parallel=False) for seed in (2, 3)]
    dirs = []
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"s{i}")
        dirs.append(tmp_path / f"s{i}")
    out = spliced_loss(dirs, identity_crosscoder(), "blocks.1.hook_resid_pre", (ids, valid), batch_size=len(ids))
    mask = torch.as_tensor(valid)[..., None]
    for m, r in zip(models, out.values()):
        clean = torch_loss(m, ids, real)
        np.testing.assert_allclose(r["spliced_loss"], clean, atol=2e-5, rtol=0)
        # resid_pre of block 1 is block 0's output
        zero = torch_loss(m, ids, real, lambda h: torch.where(mask, 0.0, h), layer=0)
        np.testing.assert_allclose(r["zero_ablated_loss"], zero, atol=2e-5, rtol=0)


def torch_sublayer_output(model, ids, real, layer, sublayer):
    seen = {}
    handle = getattr(model.gpt_neox.layers[layer], sublayer).register_forward_hook(
        lambda mod, args, out: seen.__setitem__("out", out[0] if sublayer == "attention" else out))
    try:
        with torch.no_grad():
            model(torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(real, dtype=torch.long))
    finally:
        handle.remove()
    return seen["out"]


# the sequential residual for the attention output (its MLP then reads the replacement), the parallel for the MLP;
# every hook kind in both residual forms is checked against PyTorch in tests/models/test_gpt_neox.py
@pytest.mark.parametrize("sublayer,parallel", [("attention", False), ("mlp", True)],
                         ids=["attention-sequential", "mlp-parallel"])
def test_attention_and_mlp_output_hooks_replace_only_that_sublayer(tmp_path, contexts, parallel, sublayer):
    """At hook_attn_out / hook_mlp_out the splice replaces the sublayer's output and keeps the residual that
    bypasses it: the reference is PyTorch with that module's output replaced by a forward hook."""
    ids, valid, real = contexts
    hook = "blocks.1.hook_attn_out" if sublayer == "attention" else "blocks.1.hook_mlp_out"
    models = [hf_model(seed, parallel=parallel) for seed in (4, 5)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"s{i}")
    loaded = [load_snapshot(tmp_path / f"s{i}") for i in range(2)]
    mask = torch.as_tensor(valid)[..., None]
    out = spliced_loss(loaded, identity_crosscoder(), hook, (ids, valid), batch_size=len(ids))
    for m, r in zip(models, out.values()):
        clean = torch_loss(m, ids, real)
        zero = torch_loss(m, ids, real, lambda h: torch.where(mask, 0.0, h), layer=1, sublayer=sublayer)
        np.testing.assert_allclose(r["spliced_loss"], clean, atol=2e-5, rtol=0)
        np.testing.assert_allclose(r["zero_ablated_loss"], zero, atol=2e-5, rtol=0)
        assert abs(zero - clean) > 1e-3   # the sublayer matters
    # the other snapshot's sublayer output patched in: not the other snapshot's loss, model 0 with it
    swapped = spliced_loss({"a": loaded[0], "b": loaded[1]}, None, hook, (ids, valid), batch_size=2,
                           reconstruct=lambda x: x[:, ::-1])
    theirs = torch_sublayer_output(models[1], ids, real, 1, sublayer)
    want = torch_loss(models[0], ids, real, lambda h: torch.where(mask, theirs, h), layer=1, sublayer=sublayer)
    np.testing.assert_allclose(swapped["a"]["spliced_loss"], want, atol=2e-5, rtol=0)
    assert abs(want - torch_loss(models[1], ids, real)) > 1e-3


def test_export_directory_and_contexts_object(snapshots, contexts, tmp_path):
    from crossjax.tokens import Contexts

    ids, valid, real = contexts
    params, scales, cfg = identity_crosscoder()
    crosscoder_export.export_params(params, scales, cfg, str(tmp_path / "export"))
    dirs = [p for _, p in snapshots]
    a = spliced_loss(dirs, tmp_path / "export", "blocks.0.hook_resid_post",
                     Contexts(input_ids=ids, valid=valid, doc_ids=np.arange(len(ids))), batch_size=2)
    b = spliced_loss(dirs, (params, scales, cfg), "blocks.0.hook_resid_post", {"input_ids": ids, "valid": valid},
                     attention_mask=real, batch_size=2)
    assert a == b


def _small_crosscoder(a):
    params, scales, _ = a.cc
    return params, scales, crosscoder.CrosscoderConfig(num_snapshots=2, d_model=16, num_features=4)


# case -> (the call, given a: dirs, cc, hook, ids, valid, real; the message it must raise)
ERRORS = {
    "fewer snapshots": (lambda a: spliced_loss(a.dirs[:1], a.cc, a.hook, (a.ids, a.valid)),
                        "covers 2 snapshots but 1 were given"),
    "unknown hook": (lambda a: spliced_loss(a.dirs, a.cc, "blocks.0.hook_mlp", (a.ids, a.valid)), "unknown hook"),
    "hook too deep": (lambda a: spliced_loss(a.dirs, a.cc, "blocks.5.hook_resid_post", (a.ids, a.valid)),
                      "2 layers"),
    "other d_model": (lambda a: spliced_loss(a.dirs, _small_crosscoder(a), a.hook, (a.ids, a.valid)),
                      "hidden size 32 but the crosscoder's d_model is 16"),
    "valid outside the mask": (lambda a: spliced_loss(a.dirs, a.cc, a.hook, (a.ids, a.valid),
                                                      attention_mask=np.zeros_like(a.real)),
                               "outside the attention mask"),
    "nothing valid": (lambda a: spliced_loss(a.dirs, a.cc, a.hook, (a.ids, np.zeros_like(a.valid))),
                      "no position is valid"),
    "token beyond the vocabulary": (lambda a: spliced_loss(a.dirs, a.cc, a.hook, (a.ids + VOCAB, a.valid)),
                                    "vocab_size 96"),
    "a snapshot twice": (lambda a: spliced_loss([a.dirs[0], a.dirs[0]], a.cc, a.hook, (a.ids, a.valid)), "repeat"),
    "no crosscoder": (lambda a: spliced_loss(a.dirs, None, a.hook, (a.ids, a.valid)), "reconstruct function"),
    "reconstruction of another shape": (lambda a: spliced_loss(a.dirs, None, a.hook, (a.ids, a.valid),
                                                               reconstruct=lambda x: x[:, :1]),
                                        "reconstruction has shape"),
    "valid of another shape": (lambda a: spliced_loss(a.dirs, a.cc, a.hook, (a.ids, a.valid[:, :3])),
                               "valid must be a bool array"),
    "missing export": (lambda a: spliced_loss(a.dirs, "/nonexistent/export", a.hook, (a.ids, a.valid)),
                       "not found"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(snapshots, contexts, case):
    ids, valid, real = contexts
    a = types.SimpleNamespace(dirs=[p for _, p in snapshots], cc=identity_crosscoder(),
                              hook="blocks.0.hook_resid_post", ids=ids, valid=valid, real=real)
    call, message = ERRORS[case]
    with pytest.raises(CrossjaxError, match=message):
        call(a)
