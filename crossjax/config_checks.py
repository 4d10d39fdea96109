"""Checks of a config's values against each other, each problem named with its fix; nothing is read from disk.

`validate(config)` is what every command runs before its first stage: batch vs mesh, features vs mesh, snapshots
vs mesh, the crosscoder's own settings, the data sections (`data_problems`, also run alone by the data stages via
`validate_data`). `store_snapshots`, `num_snapshots` and `store_blocks` are what the config says the store will
hold. JAX is imported only inside validate, for the device count.
"""
from __future__ import annotations

import re

from ml_collections import ConfigDict

from crossjax import crosscoder_config, snapshot_names
from crossjax.errors import CrossjaxError

SOURCES = ("planted", "snapshots")
COMPUTE_DTYPES = ("bfloat16", "float32")


def store_snapshots(config: ConfigDict) -> tuple[str, ...]:
    """The snapshot names of the store the config describes (the store is checked against these later)."""
    if config.data.source == "planted":
        return tuple(f"planted_{i}" for i in range(int(config.planted.num_snapshots)))  # planted.planted_meta
    return tuple(config.model.snapshots)


def num_snapshots(config: ConfigDict) -> int:
    """S trained on, as the config determines it: the data.snapshots subset, else every snapshot of the store."""
    entries = [e for e in str(config.data.snapshots).split(",") if e.strip()]
    return len(entries) or len(store_snapshots(config))


def store_blocks(config: ConfigDict) -> int | None:
    """The number of blocks of the store the config describes (None for an unknown data.source)."""
    if config.data.source == "planted":
        return -(-int(config.planted.num_rows) // max(int(config.planted.block_rows), 1))
    if config.data.source == "snapshots":  # one row per collected token position
        return -(-int(config.tokens.num_tokens) // max(int(config.store.block_rows), 1))
    return None


def data_problems(config: ConfigDict, source: str | None = None) -> list[str]:
    """What is wrong with the sections the data stages read, found without reading any file; `source`: the data
    source to check for (default: data.source)."""
    problems = []
    source = config.data.source if source is None else source
    if source not in SOURCES:
        problems.append(f"data.source={source!r} is not one of {SOURCES}")
    if source == "snapshots":
        from crossjax.models.neox_config import HOOK_KINDS
        hook = str(config.model.hook)
        m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", hook)
        if m is None or m.group(2) not in HOOK_KINDS:
            problems.append(f"model.hook={hook!r} is not a hook name: use 'blocks.{{i}}.{{kind}}' with kind one of "
                            f"{', '.join(HOOK_KINDS)}")
        elif config.suite.enabled and int(m.group(1)) >= int(config.suite.layers):
            problems.append(f"model.hook={hook!r} asks for layer {m.group(1)} but the suite's model has "
                            f"{config.suite.layers} layers (suite.layers); pick a layer below {config.suite.layers}")
    if config.data.on_the_fly and source != "snapshots":
        problems.append(f"data.on_the_fly=True computes model activations, but data.source={source!r}; set "
                        "data.source='snapshots' or data.on_the_fly=False")
    if int(config.store.block_rows) < 1:
        problems.append(f"store.block_rows={config.store.block_rows} must be >= 1")
    if int(config.planted.block_rows) < 1:
        problems.append(f"planted.block_rows={config.planted.block_rows} must be >= 1")
    return problems


def validate_data(config: ConfigDict, source: str | None = None) -> None:
    """Raise CrossjaxError listing data_problems(config, source), the checks the data stages alone need."""
    problems = data_problems(config, source)
    if problems:
        raise CrossjaxError("invalid config:\n  - " + "\n  - ".join(problems))


def validate(config: ConfigDict, *, num_devices: int | None = None) -> None:
    """Raise CrossjaxError listing every inconsistent value and its fix; return None when the config is usable."""
    import jax

    from crossjax import sharding

    problems = data_problems(config)
    t = config.train
    if t.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"train.compute_dtype={t.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    for key in ("batch_size", "log_every", "keep_checkpoints"):
        if int(t[key]) < 1:
            problems.append(f"train.{key}={t[key]} must be >= 1")
    for key in ("steps", "num_tokens", "warmup_steps", "checkpoint_every", "eval_every", "dead_after_tokens"):
        if int(t[key]) < 0:
            problems.append(f"train.{key}={t[key]} must be >= 0")
    blocks = store_blocks(config)
    if int(t.heldout_blocks) < 1:
        problems.append(f"train.heldout_blocks={t.heldout_blocks} must be >= 1 (evaluation needs held-out rows)")
    elif blocks is not None and int(t.heldout_blocks) >= blocks:
        problems.append(f"train.heldout_blocks={t.heldout_blocks} leaves no training data: the store will have "
                        f"{blocks} blocks; hold out fewer blocks or make a larger store")
    for key in ("cooldown_frac", "sparsity_warmup_frac"):
        if not 0.0 <= float(t[key]) <= 1.0:
            problems.append(f"train.{key}={t[key]} must lie in [0, 1]")
    if int(t.dead_after_tokens) >= 2**31 - 1:
        problems.append(f"train.dead_after_tokens={t.dead_after_tokens} must be below 2**31 - 1 (an int32 counter)")
    if not float(t.lr) >= 0.0:
        problems.append(f"train.lr={t.lr} must be >= 0")
    if not float(t.threshold_lr_scale) >= 0.0:
        problems.append(f"train.threshold_lr_scale={t.threshold_lr_scale} must be >= 0")
    if not (0.0 <= float(t.b1) < 1.0 and 0.0 <= float(t.b2) < 1.0):
        problems.append(f"train.b1={t.b1} and train.b2={t.b2} must lie in [0, 1)")
    if int(config.eval.batch_size) < 0 or int(config.eval.max_batches) < 0:
        problems.append("eval.batch_size and eval.max_batches must be >= 0 (0 = default)")
    if int(config.data.d_model) < 0:
        problems.append(f"data.d_model={config.data.d_model} must be >= 0 (0 = take it from the store)")
    if int(config.data.scale_rows) < 1 or int(config.data.window_blocks) < 1:
        problems.append("data.scale_rows and data.window_blocks must be >= 1")
    streams = int(config.data.streams)
    if streams < 0:
        problems.append(f"data.streams={streams} must be >= 0 (0 = one stream)")
    elif streams and int(t.batch_size) % streams:
        problems.append(f"data.streams={streams} must divide train.batch_size={t.batch_size}")

    s = num_snapshots(config) if config.data.source in SOURCES else 0
    if config.data.source in SOURCES and store_snapshots(config):
        try:
            snapshot_names.select(config.data.snapshots, store_snapshots(config))
        except CrossjaxError as e:
            problems.append(str(e))
    if config.data.source == "snapshots" and s == 0:
        problems.append("data.source='snapshots' needs a snapshot list: set model.snapshots "
                        "(e.g. ['step0', 'step1000'])")
    features = int(config.crosscoder.num_features)
    if features < 1:
        problems.append(f"crosscoder.num_features={features} must be >= 1")
    else:  # the activation name, k, thresholds...: the checks the trainer would make after the store is made
        try:
            crosscoder_config.CrosscoderConfig.from_config(config.crosscoder, num_snapshots=max(s, 1),
                                                           d_model=max(int(config.data.d_model), 1))
        except CrossjaxError as e:
            problems.append(str(e))

    if num_devices is None:
        num_devices = jax.device_count()
    try:
        data_ax, snap_ax, feat_ax = sharding.mesh_shape(config.mesh, num_devices,
                                                        allow_subset=jax.process_count() == 1)
    except CrossjaxError as e:
        problems.append(str(e))
    else:
        if int(t.batch_size) % data_ax:
            problems.append(f"train.batch_size={t.batch_size} is not divisible by the mesh data axis ({data_ax}); "
                            f"use a multiple of {data_ax}")
        eb = int(config.eval.batch_size)
        if eb and eb % data_ax:
            problems.append(f"eval.batch_size={eb} is not divisible by the mesh data axis ({data_ax})")
        if features >= 1 and features % feat_ax:
            problems.append(f"crosscoder.num_features={features} is not divisible by the mesh feature axis "
                            f"({feat_ax}); use a multiple of {feat_ax} or change mesh.feature")
        if s and s % snap_ax:
            problems.append(f"the {s} snapshots are not divisible by the mesh snapshot axis ({snap_ax}); "
                            "change mesh.snapshot to a divisor of the snapshot count")
    if problems:
        raise CrossjaxError("invalid config:\n  - " + "\n  - ".join(problems))
