"""The default experiment: a crosscoder over the snapshots of a tiny GPT-NeoX pre-trained here, offline.

    python -m crossjax.train --config=experiments/tiny.py --workdir=/tmp/crossjax_tiny

Stages, each cached and resumable (the same command again resumes where it stopped):
1. the offline suite (crossjax/suite): Shakespeare + KJV corpus (2.6M training tokens), a 4096-token byte-level
   BPE, and a GPT-NeoX (d_model 128, 4 layers, 4 heads, context 128, 1.8M parameters) trained for 1600 steps of
   16 x 128 tokens, with snapshots step0, step1, step2, step4, ..., step128, then every 200 steps, saved in Hugging
   Face format under $CROSSJAX_CACHE (default ~/.cache/crossjax)/suite-<fingerprint>/step<N>; its losses.json shows
   the held-out loss falling from 8.35 nats (step0) through 5.20 (step128) to 3.99 (step1600; unigram: 6.37);
2. activations of 12 of those snapshots at the attention output of the second block (blocks.1.hook_attn_out),
   over 131072 tokens of the training split (one document per context, BOS first, not packed), written to
   <workdir>/store (~390 MB);
3. a JumpReLU crosscoder with 1024 features (expansion 8), sparsity coefficient 0.1, 1000 steps of 512 tokens;
   the last store block (4096 tokens) is held out for evaluation.

Why that hook: in this small model's residual stream almost every feature is a token lookup that is already
there at step0 (a random embedding is a token code), so features forming during training barely show; the
attention output holds context features, and there they form after the statistical phase (README, "Which hook
shows concepts forming", with the sweep over layers and hook kinds). Its sparsity coefficient is lower than the
residual's 0.3 because at 0.3 two thirds of the features die there.

It prints the suite's progress, the activation plan, progress bars with tokens/s, then

    done: 1000 steps, 512000 tokens, held-out EV 0.9492
    (held-out EV and L0 per snapshot: EV 0.93 at step0, 0.99 at step128, 0.97 at step1600; L0 4-26)
    (clean, spliced-in and zero-ablated LM loss per snapshot)
    features by kind: initialisation 244, emergent 174, transient 55, persistent 551
    emergent features by the snapshot where their decoder norm first reaches 0.5 of its peak: step4: 2, ...
    summary: /tmp/crossjax_tiny/summary.json  metrics: ...  tensorboard: ...  weights: /tmp/crossjax_tiny/export

The first run took 14 minutes on this project's 2-core development machine, install included (suite about 9
minutes); later runs reuse the suite. Variant `micro` (`experiments/tiny.py:micro`) is the same pipeline at toy
sizes (a suite that builds in seconds, 4 snapshots, 4096 tokens): the end-to-end test in tests/suite/test_suite.py runs it.

get_config leaves model.path_template empty: before any stage runs, the pipeline points it at the suite's
directory, derived from the suite settings as they are after command-line overrides, and checks that
model.snapshots are among the snapshots that suite saves (so --config.suite.* overrides need nothing else).
"""
from crossjax import configs

# Snapshots of the default suite used by the crosscoder: the doubling phase thinned out, then the linear phase.
DEFAULT_SNAPSHOTS = (0, 4, 16, 32, 64, 128, 200, 400, 600, 800, 1200, 1600)
MICRO_SNAPSHOTS = (0, 4, 12, 48)


def get_config(arg: str | None = None):
    variant = arg or "default"
    if variant not in ("default", "micro"):
        raise configs.unknown_variant(variant, "tiny.py", "default or micro")
    config = configs.base_config()
    micro = variant == "micro"

    config.suite.update(configs.suite_config("micro" if micro else "default"))  # keeps the section locked
    config.suite.enabled = True
    steps = MICRO_SNAPSHOTS if micro else DEFAULT_SNAPSHOTS

    config.data.source = "snapshots"
    config.data.d_model = config.suite.d_model
    config.model.snapshots = [f"step{n}" for n in steps]
    # The attention output of the last block of the first half (see the docstring); micro's two-layer model,
    # trained for seconds, keeps the residual stream after its first block.
    half = config.suite.layers // 2 - 1
    config.model.hook = f"blocks.{half}.hook_resid_post" if micro else f"blocks.{half}.hook_attn_out"
    config.model.dtype = "float32"

    config.tokens.source = "offline"
    config.tokens.split = "train"
    config.tokens.context_len = config.suite.context_len
    config.tokens.packing = False
    config.store.dtype = "float16"

    c = config.crosscoder
    c.activation = "jumprelu"
    c.init_norm = -1.0  # grid search on the first batch, as the paper

    t = config.train
    t.compute_dtype = "float32"
    t.heldout_blocks = 1
    # at the end: each snapshot's LM loss with the reconstruction spliced in, on held-out text
    config.eval.spliced_tokens = 512 if micro else 8192
    # and the paper's analyses: linear separability of sampled features, the two phases (loss, KL to n-grams)
    config.evals = "heldout,spliced,separability,phases"
    config.eval.phases_tokens = 512 if micro else 8192
    config.eval.phases_stats_tokens = 4096 if micro else 200_000
    config.eval.report = not micro          # the train command ends by writing runs/tiny/report/index.html
    if micro:
        config.tokens.num_tokens = 4096
        config.store.block_rows = 512
        c.num_features = 64
        t.batch_size = 128
        t.steps = 60
        t.lr = 2e-3
        t.sparsity_coef = 0.01  # F/D is small here; the paper's 0.3 would leave almost no feature active
        t.warmup_steps = 5
        t.threshold_lr_scale = 1.0
        t.log_every = 10
        t.checkpoint_every = 20
        t.progress = False
        config.suite.progress = False
    else:
        config.tokens.num_tokens = 131072
        config.store.block_rows = 4096
        c.num_features = 1024
        t.batch_size = 512
        t.steps = 1000
        t.lr = 1e-3
        t.sparsity_coef = 0.1  # at the residual's 0.3, 63% of the attention output's features die
        t.warmup_steps = 100
        t.threshold_lr_scale = 1.0
        t.log_every = 100
        t.checkpoint_every = 250
        t.eval_every = 500
        t.progress = True
    return config
