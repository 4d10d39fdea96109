"""Small models, crosscoders and tasks for the attribution tests (each builds in well under a second)."""
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from crossjax import crosscoder as cc
from crossjax import tokens
from crossjax.attribution import tasks
from crossjax.models import GPTNeoX, LoadedSnapshot, NeoXConfig

VOCAB = 40
D = 16
RUN_SNAPSHOTS = 2                     # the finished run of conftest.finished_run
RUN_HOOK = "blocks.0.hook_resid_post"
WORDS = ["<|endoftext|>", "<|padding|>", "thou", "ye", "art", "are", "hast", "have", "and", "he", "said", "O", "man",
         "men", "Behold", ","]


def neox(seed: int, *, layers: int = 2, eps: float = 1e-5) -> GPTNeoX:
    cfg = NeoXConfig(vocab_size=VOCAB, hidden_size=D, num_layers=layers, num_heads=2, intermediate_size=32,
                     max_position_embeddings=32, layer_norm_eps=eps)
    model = GPTNeoX(cfg, rngs=nnx.Rngs(seed))
    # larger than the init's 0.02 so the random model's logits move with its input
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("kernel", "embedding"):
            leaf.set_value(leaf.get_value() * 20.0)
    if eps > 1:  # LayerNorm with a huge epsilon is (x - mean) / sqrt(eps): linear; scaled back to O(1) outputs
        for ln in [model.final_layer_norm] + [n for layer in model.layers
                                              for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
            ln.scale.set_value(ln.scale.get_value() * eps ** 0.5)
    return model


def snapshots(count: int, **kw) -> dict[str, LoadedSnapshot]:
    out = {}
    for s in range(count):
        model = neox(s, **kw)
        out[f"step{s}"] = LoadedSnapshot(config=model.cfg, model=model, content_hash=str(s), path=Path(f"step{s}"),
                                         name=f"step{s}")
    return out


def crosscoder(num_snapshots: int, features: int = 24, *, seed: int = 0, activation: str = "jumprelu"):
    """(params, scales, cfg) of a random crosscoder whose features fire on about half of the tokens."""
    cfg = cc.CrosscoderConfig(num_snapshots=num_snapshots, d_model=D, num_features=features, activation=activation,
                              k=4, threshold_init=0.05)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = cc.init_params(k1, cfg, 1.0)
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    params["W_enc"] = np.asarray(jax.random.normal(k2, params["W_enc"].shape), np.float32) * 0.3
    params["W_dec"] = np.asarray(jax.random.normal(k3, params["W_dec"].shape), np.float32) * 0.3
    params["b_dec"] = np.full(params["b_dec"].shape, 0.1, np.float32)
    scales = np.linspace(0.5, 1.5, num_snapshots).astype(np.float32)
    return params, scales, cfg


def id_task(count: int = 6, length: int = 7, seed: int = 0) -> tasks.TokenizedTask:
    """Random-token prompt pairs of mixed lengths, BOS first, as a TokenizedTask."""
    rng = np.random.default_rng(seed)
    pairs = []
    for p in range(count):
        n = length - (p % 3)
        clean = [0] + rng.integers(2, VOCAB, n - 1).tolist()
        corrupted = [0] + rng.integers(2, VOCAB, n - 1).tolist()
        right, wrong = rng.choice(np.arange(2, VOCAB), 2, replace=False).tolist()
        pairs.append(tasks.Pair(tuple(clean), tuple(corrupted), right, wrong, where=f"test:{p + 1}"))
    info = tokens.TokenizerInfo(tokenizer=lambda text: [], bos_id=0, eos_id=0, pad_id=1, special_ids=frozenset({0, 1}),
                                vocab_size=VOCAB, sha256="")
    return tasks.tokenize(tasks.Task("random", tuple(pairs), "test"), info)


def write_lines(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path

