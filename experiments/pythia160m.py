"""The paper's Pythia-160M crosscoder (Wu et al. 2025, arXiv 2509.17196; PAPER.md): 32 pre-training snapshots,
residual stream after block 6 (d_model 768), F = 24,576 (expansion 32), JumpReLU, 800M tokens, batch 4096.

    python -m crossjax.train --config=experiments/pythia160m.py \
        --config.store.path=gs://BUCKET/pythia160m_store --workdir=/mnt/shared/pythia160m
    python -m crossjax.train --config=experiments/pythia160m.py:x128 ...        (F = 98,304)

On several hosts add --distributed to the same command on every host; the workdir is a directory all hosts see
(local disk on one host, a shared mount on a pod). The first stage downloads the 32 revisions of
EleutherAI/pythia-160m from the Hugging Face Hub and writes the activation store (800M tokens x 32 snapshots x 768
in float16 is about 40 TB, hence a bucket for store.path); training then streams from it. It prints the plan of the
activation stage, a progress bar with tokens/s, and at the end the held-out explained variance and where the
summary, metrics, tensorboard logs and exported weights are. The paper reports about EV 0.92 at L0 40 (x32).

Meshes. By default every device is data parallel (each holds the whole crosscoder and its Adam state); check a
slice first with `python -m crossjax.plan --config=experiments/pythia160m.py:x32 --accelerator=v5e-8` and pass the
mesh it names. Per device, as the plan prints it (temporaries as XLA:CPU lays them out; the trainer prints the
plan compiled for the real devices before it starts):

    x32 (F = 24,576)   v5e-8:   22.557 GiB of 14.400 on data=8: refused; fits as data=4 snapshot=1 feature=2
                                (13.366 GiB): --config.mesh.data=4 --config.mesh.feature=2
                       v5p-32:  data=16 snapshot=1 feature=1, 22.525 GiB of 85.500: fits (the default mesh)
                       8xh100:  data=8 snapshot=1 feature=1, 22.557 GiB of 72.000: fits (the default mesh)
    x64 (F = 49,152)   v5e-8:   45.067 GiB: refused; no mesh of 8 fits at batch 4096 (the least, 15.0 GiB):
                                --config.train.batch_size=2048 --config.mesh.data=2 --config.mesh.feature=4
                                (13.366 GiB), or v5e-16 as data=4 feature=4 (13.366 GiB)
                       v5p-32:  data=16, 45.038 GiB of 85.500: fits (the default mesh)
                       8xh100:  data=8, 45.067 GiB of 72.000: fits (the default mesh)
    x128 (F = 98,304)  v5e-8:   90.086 GiB: refused; fits with --config.train.batch_size=1024
                                --config.mesh.data=1 --config.mesh.feature=8 (13.368 GiB)
                       v5p-32:  90.064 GiB of 85.500 on data=16: refused; fits as data=8 feature=2 (45.067 GiB):
                                --config.mesh.data=8 --config.mesh.feature=2
                       8xh100:  90.086 GiB of 72.000 on data=8: refused; fits as data=4 feature=2 (52.901 GiB):
                                --config.mesh.data=4 --config.mesh.feature=2

(v5p-32 is 32 TensorCores: 16 chips, 16 JAX devices; v5e-8 is 8 chips.)
"""
from crossjax import configs

# Hugging Face revisions stepN used in the paper (32 snapshots).
SNAPSHOT_STEPS = (
    0, 2, 4, 8, 16, 32, 64, 128, 256, 512,
    1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000,
    14000, 20000, 27000, 34000, 47000, 60000, 74000, 87000, 100000, 114000, 127000, 143000,
)
D_MODEL = 768
EXPANSIONS = {"x32": 32, "x64": 64, "x128": 128}


def get_config(arg: str | None = None):
    variant = arg or "x32"
    if variant not in EXPANSIONS:
        raise configs.unknown_variant(variant, "pythia160m.py", f"one of {sorted(EXPANSIONS)}")
    return configs.paper_pythia_run("EleutherAI/pythia-160m", d_model=D_MODEL, hook="blocks.6.hook_resid_post",
                                    snapshot_steps=SNAPSHOT_STEPS, num_features=D_MODEL * EXPANSIONS[variant],
                                    lr=5e-5, threshold_lr_scale=0.1)
