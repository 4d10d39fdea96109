"""The paper's Pythia-6.9B crosscoder (Wu et al. 2025, arXiv 2509.17196; PAPER.md): 32 pre-training snapshots,
residual stream after block 16 (d_model 4096), F = 32,768 (expansion 8), JumpReLU, lr 1e-5 with the threshold at
lr x 0.3, 800M tokens, batch 4096.

    python -m crossjax.plan --config=experiments/pythia6_9b.py --accelerator=v5p-32
    python -m crossjax.train --config=experiments/pythia6_9b.py \
        --config.store.path=gs://BUCKET/pythia6_9b_store --workdir=/mnt/shared/pythia6_9b --distributed

The parameters and Adam's moments alone take 96 GiB (3 x 4 bytes x 2 x 32 x 4096 x 32,768), so the default mesh
splits the features over 8 devices (mesh.feature=8) and gives the rest to data parallelism. The first stage
downloads the 32 revisions of EleutherAI/pythia-6.9b and writes the activation store (800M tokens x 32 snapshots x
4096 in float16: about 210 TB, hence a bucket for store.path); training streams from it.

What `python -m crossjax.plan` prints per device for common slices (temporaries as XLA:CPU lays them out; the
trainer prints the plan compiled for the real devices before it starts):

    --accelerator=v5p-32 (16 chips):
      mesh data=2 snapshot=1 feature=8; batch 4096 rows (2048 rows x 32 snapshots per device)
      crosscoder S=32 D=4096 F=32,768 (8,590,131,200 parameters)
      parameters           4.001 GiB
      optimizer state      8.001 GiB   Adam mu and nu
      other state          0.016 MiB   step, per-feature counters
      batch                0.500 GiB
      XLA temporaries      8.534 GiB   gradients, activations (as XLA:CPU lays them out)
      outputs, code        0.501 MiB
      total               21.036 GiB
      v5p: 95.000 GiB per device, 85.500 GiB after 10% headroom: fits
    --accelerator=8xh100: mesh data=1 snapshot=1 feature=8, total 30.067 GiB of 72.000 GiB: fits
    --accelerator=v5e-8: mesh data=1 snapshot=1 feature=8, total 30.067 GiB of 14.400 GiB: refused (exit code 2):
      It fits on 16 devices (a v5e-16) at batch 4096, mesh data=1 snapshot=2 feature=8 (14.065 GiB per device):
      --devices=16 --config.mesh.data=1 --config.mesh.snapshot=2 --config.mesh.feature=8
    --accelerator=v5e-16 --config.mesh.snapshot=2: total 14.065 GiB of 14.400 GiB: fits
"""
from crossjax import configs

# The revisions of the Pythia-160M run (experiments/pythia160m.py): every Pythia model published the same steps.
SNAPSHOT_STEPS = (
    0, 2, 4, 8, 16, 32, 64, 128, 256, 512,
    1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000,
    14000, 20000, 27000, 34000, 47000, 60000, 74000, 87000, 100000, 114000, 127000, 143000,
)
D_MODEL = 4096
NUM_FEATURES = 32_768


def get_config():
    config = configs.paper_pythia_run("EleutherAI/pythia-6.9b", d_model=D_MODEL, hook="blocks.16.hook_resid_post",
                                      snapshot_steps=SNAPSHOT_STEPS, num_features=NUM_FEATURES, lr=1e-5,
                                      threshold_lr_scale=0.3)
    # 96 GiB of parameters and Adam moments: no chip holds them whole (the docstring's plans)
    config.mesh.feature = 8
    return config
