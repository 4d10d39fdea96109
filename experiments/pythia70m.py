"""A Pythia crosscoder one GPU (or a patient CPU) finishes overnight: Pythia-70M, 8 snapshots, 8M tokens.

    python -m crossjax.plan --config=experiments/pythia70m.py --accelerator=h100 --devices=1
    python -m crossjax.train --config=experiments/pythia70m.py --workdir=/tmp/pythia70m

The paper's method (PAPER.md) at a smaller scale: the residual stream after block 3 of the 6 of
EleutherAI/pythia-70m (d_model 512), 8 of its revisions from initialisation through the turn near step 1000 to
the end of training, F = 8,192 (expansion 16), JumpReLU with the paper's penalty, one pass over 8M tokens of
SlimPajama in batches of 4096 (about 1,950 steps). The paper's lr (5e-5) and warm-up (5000 steps) are for 195k
steps; this run is 100 times shorter, so it uses lr 2e-4 and 200 warm-up steps (a starting point, not tuned).
By its FLOP count (forward passes up to block 3: about 2 PFLOP; training: about 1.4 TFLOP a step, 2.7 PFLOP) it
is minutes on a GPU and, at the 0.4-0.9 TFLOP/s two CPU cores reach on these matmuls, a few hours on a CPU
(an estimate, not a measured run).

The first stage downloads the 8 revisions; the activations are computed on the fly (data.on_the_fly): the store
under the workdir keeps only the tokens and the 4 held-out blocks, not the 66 GB a stored run needs (8M tokens x 8
snapshots x 512 in float16; --config.data.on_the_fly=False writes it all). Any
Hugging Face dataset name or save_to_disk directory with a text field can stand in: --config.tokens.path=...

The plan of one step on one device (`python -m crossjax.plan --config=experiments/pythia70m.py --devices=1
--accelerator=h100`; temporaries as XLA:CPU lays them out; the plan reads the snapshots' config.json, from the
Hub or, here, local copies given with --config.model.path_template=DIR/{snapshot}):

    mesh data=1 snapshot=1 feature=1; batch 4096 rows (4096 rows x 8 snapshots per device)
    crosscoder S=8 D=512 F=8,192 (67,129,344 parameters)
    parameters           0.250 GiB
    optimizer state      0.500 GiB   Adam mu and nu
    other state          0.031 MiB   step, per-feature counters
    batch               32.000 MiB
    XLA temporaries      3.845 GiB   gradients, activations (as XLA:CPU lays them out)
    outputs, code        0.016 MiB
    snapshot models      2.099 GiB   weights resident for on-the-fly rows
    total                6.725 GiB
    h100: 80.000 GiB per device, 72.000 GiB after 10% headroom: fits

so one GPU holds it with room to spare; `--accelerator=cpu` compares it with this machine's memory, and the
trainer prints the plan for the devices it runs on before it starts.
"""
from crossjax import configs

SNAPSHOT_STEPS = (0, 64, 256, 1000, 2000, 8000, 32000, 143000)
D_MODEL = 512
EXPANSION = 16
TRAIN_TOKENS = 8_000_000
HELDOUT_BLOCKS = 4


def get_config():
    config = configs.base_config()

    config.data.source = "snapshots"
    config.data.d_model = D_MODEL
    config.model.repo = "EleutherAI/pythia-70m"
    config.model.snapshots = [f"step{n}" for n in SNAPSHOT_STEPS]
    config.model.hook = "blocks.3.hook_resid_post"
    config.model.dtype = "float32"

    config.tokens.source = "hf_dataset"
    config.tokens.path = "cerebras/SlimPajama-627B"
    config.tokens.text_field = "text"
    config.tokens.context_len = 2048
    config.tokens.packing = False
    config.tokens.num_tokens = TRAIN_TOKENS + HELDOUT_BLOCKS * 4096
    config.store.block_rows = 4096
    config.store.dtype = "float16"
    # Activations on the fly: the 8 snapshots run inside the training loop, and only the held-out blocks are
    # stored. A block is 2 contexts of 2048 tokens, so the loader shuffles 64 blocks (128 contexts, 262,144 rows,
    # 2 GiB of host memory) together, and each block is its own write group so a block read runs only its contexts.
    config.data.on_the_fly = True
    config.data.window_blocks = 64
    config.activations.shuffle_group_rows = 4096
    config.eval.spliced_split = "validation"   # SlimPajama's held-out splits are validation and test

    c = config.crosscoder
    c.num_features = D_MODEL * EXPANSION
    c.activation = "jumprelu"
    c.init_norm = -1.0  # grid search on the first batch

    t = config.train
    t.batch_size = 4096
    t.num_tokens = TRAIN_TOKENS
    t.lr = 2e-4
    t.warmup_steps = 200
    t.log_every = 50
    t.checkpoint_every = 250
    t.eval_every = 1000
    t.heldout_blocks = HELDOUT_BLOCKS
    config.eval.max_batches = HELDOUT_BLOCKS
    return config
