"""The one way crossjax runs a GPT-NeoX: jitted forwards to hook points or to logits over a model's current weights.

    runner = Runner(loaded.model)                                   # or Runner(model, input_sharding=...)
    resid = runner.hook(input_ids, "blocks.3.hook_resid_post")      # [B,T,D] float32
    acts = runner.hook(input_ids, hook, dtype=jnp.float16)          # cast on the device, in the compiled function
    logits = runner.logits(input_ids, attention_mask)               # [B,T,V] float32

The activation stage, the spliced-in loss and the benchmarks all run models through this. The graphdef is a static
argument of module-level jitted functions, so every snapshot of one architecture shares one compilation (per hooks,
output dtype and input shapes); only the weights change from snapshot to snapshot.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from crossjax.models.gpt_neox import GPTNeoX, validate_hook


@functools.partial(jax.jit, static_argnames=("graphdef", "hooks", "dtype"))
def _run_hooks(graphdef, state, input_ids, attention_mask, *, hooks: tuple[str, ...], dtype):
    out = nnx.merge(graphdef, state).run_hooks(input_ids, list(hooks), attention_mask)
    return {h: out[h] if dtype is None else out[h].astype(dtype) for h in hooks}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _run_logits(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


class Runner:
    """Compiled forwards of `model` (its weights as they are now).

    input_sharding: where input_ids and attention_mask [B,T] are placed before each call, e.g.
    NamedSharding(mesh, P("data", None)) to split the batch over a mesh (B must then divide evenly); None puts them
    on the default device.
    """

    def __init__(self, model: GPTNeoX, *, input_sharding: jax.sharding.Sharding | None = None):
        self.cfg = model.cfg
        self._graphdef, self._state = nnx.split(model)
        self._input_sharding = input_sharding

    def _place(self, x):
        if x is None:
            return None
        return jnp.asarray(x) if self._input_sharding is None else jax.device_put(x, self._input_sharding)

    def hooks(self, input_ids, hooks: Sequence[str], attention_mask=None, *, dtype=None) -> dict[str, jax.Array]:
        """input_ids [B,T] int (attention_mask [B,T], 1 = token) -> {hook: [B,T,D]}, float32 as the model computes
        them or cast to `dtype` on the device; the blocks run only up to the deepest hook."""
        hooks = tuple([hooks] if isinstance(hooks, str) else hooks)
        for h in hooks:  # a bad name fails here, not inside tracing
            validate_hook(self.cfg, h)
        return _run_hooks(self._graphdef, self._state, self._place(input_ids), self._place(attention_mask),
                          hooks=hooks, dtype=None if dtype is None else jnp.dtype(dtype))

    def hook(self, input_ids, hook: str, attention_mask=None, *, dtype=None) -> jax.Array:
        """input_ids [B,T] -> the activations at one hook, [B,T,D] (float32, or cast to `dtype`)."""
        return self.hooks(input_ids, (hook,), attention_mask, dtype=dtype)[hook]

    def logits(self, input_ids, attention_mask=None) -> jax.Array:
        """input_ids [B,T] -> logits [B,T,V] float32 (the whole model)."""
        return _run_logits(self._graphdef, self._state, self._place(input_ids), self._place(attention_mask))
