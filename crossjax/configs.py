"""The whole configuration: one locked ConfigDict assembled from each module's section, and its validation.

`base_config()` is what experiment files start from; because the dict is locked, a misspelled key (in a file or
on the command line, `--config.train.lrr=1`) fails loudly instead of being silently ignored. `validate()` checks
values against each other (batch vs mesh, features vs mesh, ...) and says how to fix each problem.
"""
from __future__ import annotations

import ml_collections
from ml_collections import ConfigDict

from crossjax import snapshot_names
from crossjax.errors import CrossjaxError

SOURCES = ("planted", "snapshots")
COMPUTE_DTYPES = ("bfloat16", "float32")


def data_config() -> ConfigDict:
    return ConfigDict(dict(
        source="planted",      # "planted": synthetic ground truth (planted.py); "snapshots": model activations
        d_model=0,             # expected width of the stored activations; 0 = whatever the store holds
        scale_rows=16384,      # rows used to estimate the per-snapshot normalisation scales
        window_blocks=8,       # store blocks read and shuffled together by the loader
        streams=0,             # loader read streams; 0: one per process. Fix it (e.g. 8) to get the same batches,
                               # and to resume, on any number of hosts
        snapshots="",          # comma-separated names (or 0-based indices) of the store's snapshots to train on
                               # ("" = all); one name trains an ordinary per-snapshot SAE on the same store
                               # (crossjax.compare)
    ))


def train_config() -> ConfigDict:
    """Training hyperparameters; defaults are the paper's Pythia-160M run (PAPER.md)."""
    return ConfigDict(dict(
        batch_size=4096,         # tokens (rows) per step, global over all devices
        steps=0,                 # > 0: number of steps; else from num_tokens; else one pass over the training rows
        num_tokens=0,
        lr=5e-5,
        threshold_lr_scale=0.1,  # log_threshold learns at lr * this
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        warmup_steps=5000,       # linear lr warm-up from 0
        cooldown_frac=0.2,       # linear decay to 0 over this last fraction of steps
        sparsity_coef=0.3,       # lambda
        sparsity_warmup_frac=0.1,  # lambda grows linearly from 0 over this first fraction of steps
        dead_after_tokens=10_000_000,  # a feature not fired for this many tokens counts as dead (AuxK)
        compute_dtype="bfloat16",
        seed=0,
        log_every=100,
        checkpoint_every=1000,
        keep_checkpoints=3,
        async_checkpointing=True,
        eval_every=0,            # 0: evaluate only at the end
        heldout_blocks=1,        # the store's last blocks, never trained on
        progress=True,           # tqdm progress bar
    ))


def mesh_config() -> ConfigDict:
    return ConfigDict(dict(data=-1, snapshot=1, feature=1))  # data=-1: all devices left over


def eval_config() -> ConfigDict:
    return ConfigDict(dict(
        batch_size=0,               # 0: the training batch size (capped by the held-out rows)
        max_batches=0,              # 0: the whole held-out split
        recovery_threshold=0.9,     # planted data: a true feature counts as recovered above this cosine
        emergence_threshold=0.25,   # planted data: normalised decoder norm that marks a learned feature as present
                                    # (below the planted ramp's half-strength step at the emergence snapshot)
        presence=0.1,               # planted data: a true feature counts where its strength >= this * its peak
        spliced_tokens=0,           # model snapshots: > 0 measures, at the end, each snapshot's next-token loss with
                                    # the hook's residual replaced by the reconstruction, over about this many tokens
        spliced_split="heldout",    # tokens.split used for those contexts (offline corpus / HF dataset split)
    ))


def base_config() -> ConfigDict:
    """Every section with its defaults, locked: unknown keys raise, types are checked on assignment."""
    from crossjax import activations, crosscoder, planted, store, tokens
    from crossjax.models import load as model_load
    from crossjax.suite import pretrain

    config = ConfigDict()
    config.store = store.default_config()
    config.planted = planted.default_config()
    config.model = model_load.default_config()
    config.tokens = tokens.default_config()
    config.activations = activations.default_config()
    config.suite = pretrain.default_config()
    config.crosscoder = crosscoder.default_config()
    config.data = data_config()
    config.train = train_config()
    config.mesh = mesh_config()
    config.eval = eval_config()
    config.lock()
    return config


def store_snapshots(config: ConfigDict) -> tuple[str, ...]:
    """The snapshot names of the store the config describes (the store is checked against these later)."""
    if config.data.source == "planted":
        return tuple(f"planted_{i}" for i in range(int(config.planted.num_snapshots)))  # planted.planted_meta
    return tuple(config.model.snapshots)


def num_snapshots(config: ConfigDict) -> int:
    """S trained on, as the config determines it: the data.snapshots subset, else every snapshot of the store."""
    entries = [e for e in str(config.data.snapshots).split(",") if e.strip()]
    return len(entries) or len(store_snapshots(config))


def validate(config: ConfigDict, *, num_devices: int | None = None) -> None:
    """Raise CrossjaxError listing every inconsistent value and its fix; return None when the config is usable."""
    import jax

    from crossjax import sharding

    problems: list[str] = []
    t = config.train
    if config.data.source not in SOURCES:
        problems.append(f"data.source={config.data.source!r} is not one of {SOURCES}")
    if t.compute_dtype not in COMPUTE_DTYPES:
        problems.append(f"train.compute_dtype={t.compute_dtype!r} is not one of {COMPUTE_DTYPES}")
    for key in ("batch_size", "log_every", "keep_checkpoints"):
        if int(t[key]) < 1:
            problems.append(f"train.{key}={t[key]} must be >= 1")
    for key in ("steps", "num_tokens", "warmup_steps", "checkpoint_every", "eval_every", "dead_after_tokens"):
        if int(t[key]) < 0:
            problems.append(f"train.{key}={t[key]} must be >= 0")
    if int(t.heldout_blocks) < 1:
        problems.append(f"train.heldout_blocks={t.heldout_blocks} must be >= 1 (evaluation needs held-out rows)")
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
        problems.append(f"data.streams={streams} must be >= 0 (0 = one per process)")
    elif streams and (int(t.batch_size) % streams or streams % jax.process_count()):
        problems.append(f"data.streams={streams} must divide train.batch_size={t.batch_size} and be a multiple of "
                        f"the {jax.process_count()} processes")

    s = num_snapshots(config) if config.data.source in SOURCES else 0
    if config.data.source in SOURCES and store_snapshots(config):
        try:
            snapshot_names.select(config.data.snapshots, store_snapshots(config))
        except CrossjaxError as e:
            problems.append(str(e))
    if config.data.source == "snapshots" and s == 0:
        problems.append("data.source='snapshots' needs a snapshot list: set model.snapshots (e.g. ['step0', 'step1000'])")
    features = int(config.crosscoder.num_features)
    if features < 1:
        problems.append(f"crosscoder.num_features={features} must be >= 1")

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


def flatten(config: ConfigDict, prefix: str = "") -> dict:
    """{'train.lr': 5e-5, ...}: dotted keys to leaf values (lists kept as lists)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ConfigDict, ml_collections.FrozenConfigDict)):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out
