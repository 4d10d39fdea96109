"""A crosscoder on synthetic planted features, where the truth is known: does training recover it?

    python -m crossjax.train --config=experiments/synthetic.py:quick --workdir=/tmp/crossjax_quick

writes a planted store (4 snapshots, d_model 32, 48 true features that persist, emerge, decay or come and go;
crossjax/planted.py) under the workdir, trains a 128-feature JumpReLU crosscoder on it, and prints

    done: 1500 steps, 768000 tokens, held-out EV 0.9492
    planted recovery: mean max cosine 0.987, fraction above 0.9: 0.968
    emergence snapshot of the 15 emergent features: exact 0.80, within one 0.87
    (then held-out EV and L0 per snapshot, feature kinds and the emergence histogram)
    summary: /tmp/crossjax_quick/summary.json  metrics: ...  tensorboard: ...  weights: ...

in about 10-30 s on 2 CPU cores (one device; the numbers above are from that setting: other device counts change
the batch order and the numbers slightly). tests/trainer/test_trainer_quick.py checks the recovery. Variants: `quick` (above); `default` (8 snapshots, d_model 64, 128 true features, 256 learned, 2500 steps of 1024
rows; about 1.5-6 minutes on 2 CPU cores, printing held-out EV 0.9470, mean max cosine 0.986, fraction above
0.9: 0.973, emergence exact 0.67 / within one 0.77 of 39 emergent features); `tiny` (8 steps on a minimal store, for
tests).
"""
from crossjax import configs


def get_config(arg: str | None = None):
    variant = arg or "quick"
    config = configs.base_config()
    config.data.source = "planted"
    config.store.path = "store"
    config.mesh.data = -1
    t = config.train
    t.compute_dtype = "float32"
    t.threshold_lr_scale = 1.0
    t.progress = True
    c = config.crosscoder
    c.init_norm = -1.0

    if variant == "quick":
        p = config.planted
        p.num_snapshots, p.d_model, p.num_features = 4, 32, 48
        p.num_rows, p.block_rows = 3 * 65536, 8192
        p.firing_prob = 0.04
        c.num_features = 128
        t.batch_size = 512
        t.steps = 1500
        t.lr = 2e-3
        t.warmup_steps = 50
        t.sparsity_coef = 0.3
        t.log_every = 100
        t.checkpoint_every = 500
        t.heldout_blocks = 1
    elif variant == "default":
        p = config.planted
        p.num_rows, p.block_rows = 4 * 65536, 8192
        c.num_features = 256
        t.batch_size = 1024
        t.steps = 2500
        t.lr = 2e-3
        t.warmup_steps = 100
        t.log_every = 100
        t.checkpoint_every = 500
        t.eval_every = 1000
    elif variant == "tiny":
        p = config.planted
        p.num_snapshots, p.d_model, p.num_features = 4, 16, 16
        p.num_rows, p.block_rows = 4096, 512
        c.num_features = 64
        c.init_norm = 0.5
        t.batch_size = 64
        t.steps = 8
        t.lr = 1e-3
        t.warmup_steps = 2
        t.log_every = 2
        t.checkpoint_every = 4
        t.heldout_blocks = 1
        t.progress = False
    else:
        raise configs.unknown_variant(variant, "synthetic.py", "quick, default or tiny")
    return config
