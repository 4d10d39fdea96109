"""The suite's language model: GPT-NeoX of the suite settings, its initial weights and its jitted training step.

Training follows Pythia's recipe at a small scale (crossjax.optim): AdamW (0.9, 0.95, weight decay on matrices
only) after gradient clipping at 1.0; linear warm-up then cosine decay to `min_lr_frac * lr`.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crossjax import optim
from crossjax.models import GPTNeoX, NeoXConfig, lm_loss
from crossjax.suite import tokenizer as tokenizer_lib


def neox_config(s: dict) -> NeoXConfig:
    """The architecture of the suite settings `s` (a validated section as a dict)."""
    return NeoXConfig(
        vocab_size=s["vocab_size"], hidden_size=s["d_model"], num_layers=s["layers"], num_heads=s["heads"],
        intermediate_size=s["intermediate"] or 4 * s["d_model"], rotary_pct=float(s["rotary_pct"]),
        max_position_embeddings=s["context_len"], use_parallel_residual=True,
        bos_token_id=tokenizer_lib.EOS_ID, eos_token_id=tokenizer_lib.EOS_ID)


def init_params(s: dict):
    """(graphdef, params nnx.State) of a fresh model: normal(0.02) weights, output projections of each block
    scaled by 1/sqrt(2 * layers) (GPT-2 / Pythia-style small init on the residual branches)."""
    model = GPTNeoX(neox_config(s), rngs=nnx.Rngs(params=s["seed"]))
    scale = 1.0 / math.sqrt(2 * s["layers"])
    for layer in model.layers:
        for lin in (layer.attention.dense, layer.mlp.dense_4h_to_h):
            lin.kernel[...] = lin.kernel[...] * scale
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def optimizer(s: dict) -> optax.GradientTransformation:
    schedule = optim.warmup_cosine(s["lr"], warmup_steps=s["warmup_steps"], total_steps=s["steps"],
                                   min_lr_frac=s["min_lr_frac"])
    return optim.clipped_adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=s["weight_decay"])


class Trainer:
    """Jitted train step and evaluation over a (graphdef, params, opt_state) triple."""

    def __init__(self, s: dict):
        self.graphdef, params = init_params(s)
        self.tx = optimizer(s)
        graphdef, tx = self.graphdef, self.tx

        def loss_fn(params, tokens):
            return lm_loss(nnx.merge(graphdef, params)(tokens), tokens)

        def step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.loss = jax.jit(loss_fn)
        self._init_params = params

    def fresh_state(self):
        """(params, opt_state) at step 0, as new buffers (the step donates its inputs)."""
        params = jax.tree.map(jnp.copy, self._init_params)
        return params, self.tx.init(params)

    def model(self, params) -> GPTNeoX:
        return nnx.merge(self.graphdef, params)

    def evaluate(self, params, tokens: np.ndarray, batch: int) -> float:
        """Mean next-token loss (nats) over contexts [C, T], weighting every batch by its size."""
        total, n = 0.0, 0
        for i in range(0, len(tokens), batch):
            chunk = tokens[i: i + batch]
            total += float(self.loss(params, jnp.asarray(chunk))) * len(chunk)
            n += len(chunk)
        return total / n


_TRAINER_KEYS = ("vocab_size", "d_model", "layers", "heads", "intermediate", "rotary_pct", "context_len", "steps",
                 "lr", "warmup_steps", "min_lr_frac", "weight_decay", "seed")
_trainers: dict[str, Trainer] = {}


def get_trainer(s: dict) -> Trainer:
    """A Trainer for these settings, reused within a process so a rebuild does not compile again."""
    key = json.dumps({k: s[k] for k in _TRAINER_KEYS}, sort_keys=True)
    if key not in _trainers:
        if len(_trainers) >= 4:
            _trainers.clear()
        _trainers[key] = Trainer(s)
    return _trainers[key]
