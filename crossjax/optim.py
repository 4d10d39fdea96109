"""Learning-rate schedules and optimizers shared by the crosscoder trainer and the suite's pre-training.

Both take the optax step count (number of updates applied so far) and return the rate of the next update.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def warmup_cooldown(lr: float, *, warmup_steps: int, total_steps: int, cooldown_frac: float):
    """Linear warm-up from 0 over warmup_steps, constant, then linear decay to 0 over the last cooldown_frac of
    total_steps (the crosscoder's schedule, PAPER.md)."""
    warmup = int(warmup_steps)
    cool_start = int(round(total_steps * (1.0 - float(cooldown_frac))))
    cool_len = max(1, total_steps - cool_start)
    lr = float(lr)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else 1.0
        cool = jnp.clip((total_steps - count) / cool_len, 0.0, 1.0) if cool_start < total_steps else 1.0
        return lr * warm * cool
    return schedule


def warmup_cosine(lr: float, *, warmup_steps: int, total_steps: int, min_lr_frac: float):
    """Linear warm-up from lr / warmup_steps (never 0: step 1 must differ from step 0), then cosine decay to
    lr * min_lr_frac at total_steps (the suite's Pythia-like pre-training schedule)."""
    lr, steps, floor = float(lr), int(total_steps), float(min_lr_frac)
    warm = max(1, min(int(warmup_steps), steps))

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = lr * jnp.minimum(1.0, (count + 1.0) / warm)
        progress = jnp.clip((count + 1.0 - warm) / max(1, steps - warm), 0.0, 1.0)
        cosine = lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(count + 1.0 < warm, ramp, cosine)
    return schedule


def linear_ramp(value: float, *, ramp_steps: float):
    """value * min(1, (step + 1) / ramp_steps); constant when ramp_steps <= 0 (the sparsity coefficient's warm-up)."""
    n, value = float(ramp_steps), float(value)

    def schedule(step):
        if n <= 0:
            return jnp.float32(value)
        return value * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / n)
    return schedule


def adam_with_threshold_rate(schedule, *, b1: float, b2: float, eps: float,
                             threshold_lr_scale: float) -> optax.GradientTransformation:
    """Adam without weight decay or clipping (PAPER.md); the `log_threshold` parameter learns at
    schedule * threshold_lr_scale, every other parameter at schedule."""
    scale = float(threshold_lr_scale)
    adam = lambda sched: optax.adam(sched, b1=float(b1), b2=float(b2), eps=float(eps))
    labels = lambda params: {k: ("threshold" if k == "log_threshold" else "main") for k in params}
    return optax.multi_transform({"main": adam(schedule), "threshold": adam(lambda c: schedule(c) * scale)}, labels)


def clipped_adamw(schedule, *, b1: float, b2: float, eps: float, weight_decay: float,
                  clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with weight decay on matrices only (not biases or norms)."""
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
