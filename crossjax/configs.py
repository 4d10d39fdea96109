"""The whole configuration as data: every section's defaults, the locked config they make, experiment files.

`base_config()` is what experiment files start from; because the dict is locked, a misspelled key (in a file or
on the command line, `--config.train.lrr=1`) fails loudly instead of being silently ignored. The values are checked
against each other by crossjax/config_checks.py. `load_experiment("experiments/tiny.py:micro")` is the one way to
read an experiment file.

Nothing here imports JAX: an experiment file imports only this module, and building its config reads no file and
starts no backend.
"""
from __future__ import annotations

import importlib.util
import inspect
import os

from ml_collections import ConfigDict

from crossjax import crosscoder_config
from crossjax.errors import CrossjaxError

# ----------------------------------------------------------------------------------------------------------------
# The sections, one per stage (each module reads its own; the crosscoder's defaults are its dataclass's, in
# crossjax/crosscoder_config.py, which imports no JAX either)

def store_config() -> ConfigDict:
    """The ``store`` config section (crossjax/store.py)."""
    return ConfigDict(
        {
            "path": "store",  # relative paths are under the workdir; or a kvstore URL (gs://..., file://...)
            "block_rows": 4096,  # rows per block R: one chunk file holds R rows of one snapshot
            "dtype": "float16",  # "float16" | "bfloat16"
        }
    )


def planted_config() -> ConfigDict:
    """The ``planted`` config section (crossjax/planted.py)."""
    return ConfigDict(
        {
            "num_snapshots": 8,
            "d_model": 64,
            "num_features": 128,  # true features F
            "num_rows": 65536,
            "block_rows": 4096,
            "dtype": "float16",
            "firing_prob": 0.02,  # each feature fires independently on a row with this probability
            "magnitude_sigma": 0.75,  # lognormal sigma of firing magnitudes (heavy tail)
            "noise_std": 0.05,  # isotropic Gaussian noise per coordinate
            "drift": 0.05,  # slow direction drift per snapshot, radians
            "persistent_fraction": 0.4,
            "emergent_fraction": 0.3,
            "init_decay_fraction": 0.15,
            "transient_fraction": 0.15,
            "rotation_fraction": 0.25,  # of the persistent features, the ones that turn sharply once
            "rotation_angle": 60.0,  # degrees
            "seed": 0,
        }
    )


def model_config() -> ConfigDict:
    """The `model` config section (crossjax/models/load.py)."""
    return ConfigDict({
        "snapshots": [],                 # snapshot names: Hub revisions (stepN) or values for {snapshot}
        "repo": "",                      # Hub repo, e.g. EleutherAI/pythia-160m; snapshot = revision
        "path_template": "",             # local alternative: a directory path containing {snapshot}
        "hook": "blocks.6.hook_resid_post",
        "dtype": "float32",
        "allow_duplicate_weights": False,
        "cache_dir": "",                 # Hub cache ("" = huggingface_hub's default)
    })


def tokens_config() -> ConfigDict:
    """The ``tokens`` config section (crossjax/tokens.py)."""
    return ConfigDict(
        dict(
            source="offline",  # offline | text | jsonl | hf_dataset
            path="",  # file, glob or directory (text/jsonl); save_to_disk directory or dataset name (hf_dataset)
            text_field="text",  # jsonl / hf_dataset field holding the document text
            context_len=2048,  # T: tokens per context, BOS included
            num_tokens=1_048_576,  # stored rows (valid token positions) to collect
            packing=False,  # False: one document per context (paper); True: documents concatenated
            seed=0,  # document order
            split="train",  # offline corpus split or dataset split
        )
    )


def activations_config() -> ConfigDict:
    """The ``activations`` config section (crossjax/activations.py)."""
    return ConfigDict(
        dict(
            contexts_per_batch=8,  # contexts per forward call (fixed shape: one compilation)
            shuffle=True,  # one seeded row permutation shared by all snapshots, applied at write time
            seed=0,  # seeds the context order and the within-group row permutations
            shuffle_group_rows=262_144,  # rows shuffled together and held in memory at once (whole blocks)
        )
    )


def suite_config(preset: str = "default") -> ConfigDict:
    """The `suite` config section (crossjax/suite/pretrain.py). preset "default": the tiny experiment's model
    (about 990 s of CPU time to build, so roughly 8-12 minutes on 2 idle CPU cores); "micro": a model that builds
    in seconds, for tests."""
    base = dict(
        enabled=False,        # build (or reuse) the suite before generating activations
        dir="",               # "" -> $CROSSJAX_CACHE or ~/.cache/crossjax, then suite-<fingerprint>
        vocab_size=4096,
        d_model=128,
        layers=4,
        heads=4,
        intermediate=0,       # 0 -> 4 * d_model
        rotary_pct=0.25,      # as Pythia
        context_len=128,
        batch=16,             # contexts per step
        steps=1600,
        lr=2e-3,
        warmup_steps=100,
        min_lr_frac=0.1,      # cosine decay ends at lr * min_lr_frac
        weight_decay=0.01,
        snapshots=[],         # explicit snapshot steps; [] -> derived from log_until and linear_snapshots
        log_until=128,        # 0, 1, 2, 4, ..., log_until (powers of two up to steps)
        linear_snapshots=8,   # then steps * k / linear_snapshots (k = 1..) past log_until, ending at `steps`
        max_documents=0,      # > 0: train on an evenly spread subset of this many training documents
        eval_contexts=64,     # fixed contexts of each split for the per-snapshot losses
        seed=0,
        progress=True,
    )
    if preset == "micro":
        base.update(vocab_size=384, d_model=32, layers=2, heads=2, context_len=32, batch=8, steps=48, lr=3e-3,
                    warmup_steps=4, log_until=8, linear_snapshots=4, max_documents=120, eval_contexts=16)
    elif preset != "default":
        raise CrossjaxError(f"Unknown suite preset {preset!r}: use 'default' or 'micro'.")
    return ConfigDict(base)


def data_config() -> ConfigDict:
    return ConfigDict(dict(
        source="planted",      # "planted": synthetic ground truth (planted.py); "snapshots": model activations
        d_model=0,             # expected width of the stored activations; 0 = whatever the store holds
        scale_rows=16384,      # rows used to estimate the per-snapshot normalisation scales
        window_blocks=8,       # store blocks read and shuffled together by the loader
        streams=0,             # loader read streams (0: one). The batch order never depends on the host count; with
                               # a multiple of the host count, each host reads only its own streams' windows
        snapshots="",          # comma-separated names (or 0-based indices) of the store's snapshots to train on
                               # ("" = all); one name trains an ordinary per-snapshot SAE on the same store
                               # (crossjax.compare)
        on_the_fly=False,      # data.source="snapshots" only: the snapshots (resident on the devices) compute the
                               # training rows as the loader reads them (crossjax/live_store.py); the store keeps
                               # only the tokens and the train.heldout_blocks held-out blocks. Same batches as the
                               # stored path; set activations.shuffle_group_rows = store.block_rows with it
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
        emergence_threshold=0.5,    # a learned feature is present at a snapshot where its decoder norm reaches this
                                    # fraction of its peak (analysis.evolution.PRESENT): its emergence snapshot, its
                                    # kind in the summary, and the planted recovery's emergence all use it
        presence=0.1,               # planted data: a true feature counts where its strength >= this * its peak
        spliced_tokens=0,           # model snapshots: > 0 measures, at the end, each snapshot's next-token loss with
                                    # the hook's residual replaced by the reconstruction, over about this many tokens
        spliced_split="heldout",    # tokens.split used for those contexts (offline corpus / HF dataset split)
        clusters=6,                 # k of the k-means clusters of strength curves in the summary (seed: train.seed)
        separability_features=32,   # evals "separability": features probed (drawn among those that fire enough)
        separability_rows=4096,     # and held-out rows read for the probes (half to train, half for the AUC)
        phases_tokens=0,            # evals "phases", model snapshots: > 0 measures each snapshot's loss and KL to the
                                    # corpus unigram/bigram statistics over about this many held-out tokens
        phases_stats_tokens=1_000_000,  # training-split tokens the unigram/bigram statistics are counted over
        attribution_task="",        # evals "attribution", model snapshots: a bundled task (kjv_agreement, ioi, sva,
                                    # induction, ...) or a .jsonl file attributed at every snapshot ("": skipped)
        attribution_methods="attribution,clean_minus_corrupted,integrated_gradients",  # each gets its own curves
        attribution_ig_steps=32,    # integrated-gradients steps (midpoint rule)
        attribution_draws=3,        # random feature sets averaged per k of the ablation/retention curves
        attribution_max_k=0,        # largest k of the curves' log grid 1, 2, 4, ... (0: every active feature)
        attribution_skip_invalid=False,  # leave out pairs the run's tokenizer cannot take instead of stopping
        report=False,               # the train command ends by writing workdir/report/ (crossjax.report)
    ))


def base_config() -> ConfigDict:
    """Every section with its defaults, locked: unknown keys raise, types are checked on assignment."""
    config = ConfigDict()
    config.store = store_config()
    config.planted = planted_config()
    config.model = model_config()
    config.tokens = tokens_config()
    config.activations = activations_config()
    config.suite = suite_config()
    config.crosscoder = crosscoder_config.default_config()  # from CrosscoderConfig's defaults
    config.data = data_config()
    config.train = train_config()
    config.mesh = mesh_config()
    config.eval = eval_config()
    # the evaluators run at the end of every run (crossjax/evals/<name>.py, in this order); each skips itself
    # where it does not apply (recovery: planted data only; spliced: model snapshots with eval.spliced_tokens > 0)
    config.evals = "heldout,recovery,spliced"
    config.lock()
    return config


# ----------------------------------------------------------------------------------------------------------------
# Experiment files

def load_experiment(spec: str) -> ConfigDict:
    """`path/to/file.py` or `path/to/file.py:variant` -> the ConfigDict its get_config(variant) returns, locked.

    As ml_collections' --config flag: the path is relative to the working directory, and everything after the
    first ':' is the variant (it may hold ':' itself). get_config() is called without an argument when no variant
    is given. Each problem with the file raises CrossjaxError naming it and the fix.
    """
    path, _, variant = str(spec).partition(":")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise CrossjaxError(f"experiment file {path!r} does not exist{where}; give the path of a Python file "
                            "that defines get_config(), e.g. --config=experiments/synthetic.py:quick")
    name = "crossjax_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CrossjaxError(f"experiment file {path!r} is not a Python file; give a .py file that defines get_config()")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CrossjaxError(f"{e.filename or path} line {e.lineno} is not valid Python ({e.msg}); fix that line "
                            "of the experiment file") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise CrossjaxError(f"experiment file {path} defines no get_config(); add `def get_config(arg=None)` "
                            "that returns configs.base_config() with the experiment's changes")
    args = (variant,) if variant else ()
    try:
        inspect.signature(get_config).bind(*args)
    except TypeError:
        if variant:
            raise CrossjaxError(f"get_config() of {path} takes no variant, so {spec!r} cannot select "
                                f"{variant!r}; give {path} alone") from None
        raise CrossjaxError(f"get_config() of {path} needs a variant: give {path}:<variant>") from None
    try:
        config = get_config(*args)
    except CrossjaxError:
        raise
    except ValueError as e:  # an experiment's own complaint (e.g. an unknown variant): its message as it is
        raise CrossjaxError(str(e)) from e
    if not isinstance(config, ConfigDict):
        raise CrossjaxError(f"get_config() of {path} returned {type(config).__name__}, not a ConfigDict; return "
                            "configs.base_config() with the experiment's changes")
    config.lock()
    return config


def paper_pythia_run(repo: str, *, d_model: int, hook: str, snapshot_steps, num_features: int, lr: float,
                     threshold_lr_scale: float) -> ConfigDict:
    """The paper's Pythia crosscoder recipe (PAPER.md): JumpReLU with its penalty, SlimPajama contexts of 2048 with
    BOS (not packed), 800M training tokens plus 16 held-out blocks of 4096, batch 4096, Adam with 5000 warm-up
    steps, lambda 0.3; the model and the learning rates are the arguments."""
    config = base_config()
    config.data.source = "snapshots"
    config.data.d_model = int(d_model)
    config.data.streams = 8    # a pod's hosts (up to 8, or a divisor) each read only their own windows
    config.eval.spliced_split = "validation"   # SlimPajama's held-out splits are validation and test
    config.model.repo = repo
    config.model.snapshots = [f"step{n}" for n in snapshot_steps]
    config.model.hook = hook
    config.model.dtype = "float32"
    tok = config.tokens
    tok.source, tok.path, tok.text_field = "hf_dataset", "cerebras/SlimPajama-627B", "text"
    tok.context_len, tok.packing, tok.num_tokens = 2048, False, 800_000_000 + 16 * 4096
    config.store.block_rows, config.store.dtype = 4096, "float16"
    c = config.crosscoder
    c.num_features, c.activation = int(num_features), "jumprelu"
    c.threshold_init, c.jump_bandwidth, c.tanh_k, c.tanh_c = 0.1, 4.0, 4.0, 0.01
    c.init_norm = -1.0  # grid search on the first batch
    t = config.train
    t.batch_size, t.num_tokens, t.lr, t.threshold_lr_scale = 4096, 800_000_000, float(lr), float(threshold_lr_scale)
    t.b1, t.b2, t.warmup_steps, t.cooldown_frac = 0.9, 0.999, 5000, 0.2
    t.sparsity_coef, t.sparsity_warmup_frac, t.compute_dtype = 0.3, 0.1, "bfloat16"
    t.log_every, t.checkpoint_every, t.keep_checkpoints, t.eval_every = 100, 5000, 3, 20000
    t.heldout_blocks = 16
    config.eval.max_batches = 16
    return config


def unknown_variant(variant: str, experiment: str, choices: str) -> CrossjaxError:
    """The error an experiment file raises for a variant it does not have: `raise configs.unknown_variant(...)`."""
    return CrossjaxError(f"unknown variant {variant!r} of {experiment}: use {choices}")
