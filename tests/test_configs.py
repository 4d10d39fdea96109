"""crossjax.configs: the locked base config, validation messages, and the experiment files."""
import importlib.util
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from crossjax import configs, sharding, trainer
from crossjax.errors import CrossjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_base_config_has_every_section_and_is_locked():
    c = configs.base_config()
    assert set(c.keys()) == {"store", "planted", "model", "tokens", "activations", "suite", "crosscoder",
                             "data", "train", "mesh", "eval"}
    # PAPER.md defaults
    assert (c.train.batch_size, c.train.lr, c.train.threshold_lr_scale) == (4096, 5e-5, 0.1)
    assert (c.train.b1, c.train.b2, c.train.cooldown_frac, c.train.sparsity_coef) == (0.9, 0.999, 0.2, 0.3)
    assert c.train.sparsity_warmup_frac == 0.1
    assert (c.mesh.data, c.mesh.snapshot, c.mesh.feature) == (-1, 1, 1)
    with pytest.raises(AttributeError) as e:
        c.train.lrr = 1
    assert 'Did you mean "lr"' in str(e.value) and "batch_size" in str(e.value) and "heldout_blocks" in str(e.value)
    with pytest.raises(TypeError):
        c.train.batch_size = "many"  # types are checked on assignment too


def test_unknown_key_on_the_command_line_fails_with_the_valid_keys(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
                        "--config.train.lrr=1", f"--workdir={tmp_path / 'w'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "lrr" in r.stderr and "lr" in r.stderr and "batch_size" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # nothing was created


def test_validate_accepts_the_shipped_experiments():
    for name, arg in [("synthetic", "quick"), ("synthetic", "tiny"), ("synthetic", "default"), ("pythia160m", None)]:
        configs.validate(_experiment(name, arg), num_devices=8)
    with pytest.raises(CrossjaxError, match="unknown variant"):
        _experiment("synthetic", "nope")


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: setattr(c.train, "batch_size", 100), "train.batch_size=100 is not divisible by the mesh data axis (8)"),
    (lambda c: (setattr(c.mesh, "feature", 8), setattr(c.crosscoder, "num_features", 100)),
     "crosscoder.num_features=100 is not divisible by the mesh feature axis (8)"),
    (lambda c: (setattr(c.mesh, "snapshot", 2), setattr(c.planted, "num_snapshots", 3)),
     "the 3 snapshots are not divisible by the mesh snapshot axis (2)"),
    (lambda c: setattr(c.data, "source", "files"), "data.source='files' is not one of"),
    (lambda c: setattr(c.train, "compute_dtype", "float16"), "train.compute_dtype='float16'"),
    (lambda c: setattr(c.train, "cooldown_frac", 1.5), "train.cooldown_frac=1.5 must lie in [0, 1]"),
    (lambda c: setattr(c.train, "heldout_blocks", 0), "train.heldout_blocks=0 must be >= 1"),
    (lambda c: setattr(c.mesh, "snapshot", 3), "does not divide the 8 devices"),
    (lambda c: (setattr(c.data, "source", "snapshots"), setattr(c.model, "snapshots", [])),
     "needs a snapshot list"),
])
def test_validate_names_each_problem_and_its_fix(edit, fragment):
    c = _experiment("synthetic", "tiny")
    edit(c)
    with pytest.raises(CrossjaxError) as e:
        configs.validate(c, num_devices=8)
    assert fragment in str(e.value)


def test_validate_lists_all_problems_at_once():
    c = _experiment("synthetic", "tiny")
    c.train.batch_size = 100
    c.train.lr = -1.0
    with pytest.raises(CrossjaxError) as e:
        configs.validate(c, num_devices=8)
    assert "batch_size=100" in str(e.value) and "train.lr=-1.0" in str(e.value)


def test_pythia160m_matches_the_paper_and_builds_its_abstract_state():
    c = _experiment("pythia160m")
    assert len(c.model.snapshots) == 32 and c.model.snapshots[0] == "step0" and c.model.snapshots[-1] == "step143000"
    assert c.model.snapshots[10] == "step1000" and c.model.repo == "EleutherAI/pythia-160m"
    assert c.model.hook == "blocks.6.hook_resid_post" and c.crosscoder.num_features == 24576
    assert (c.train.lr, c.train.batch_size, c.train.sparsity_coef, c.train.compute_dtype) == (5e-5, 4096, 0.3,
                                                                                             "bfloat16")
    steps = math.ceil(c.train.num_tokens / c.train.batch_size)
    cc, tx, state = trainer.abstract_train_state(c, num_snapshots=32, d_model=c.data.d_model, total_steps=steps)
    p = state["params"]
    assert p["W_enc"].shape == (32, 768, 24576) and p["W_dec"].shape == (32, 24576, 768)
    assert p["b_dec"].shape == (32, 768) and p["b_enc"].shape == (24576,) and p["log_threshold"].shape == (24576,)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))  # nothing allocated
    # params + Adam mu + nu, float32: 3 * 4 bytes * (2*S*D*F + ...) ~ 58 GB, which is why the state is sharded
    nbytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert 3 * 4 * 2 * 32 * 768 * 24576 <= nbytes < 3 * 4 * 2 * 32 * 768 * 24576 * 1.01
    # and it can be laid out on a (2, 2, 2) mesh
    mesh = sharding.make_mesh(c.mesh.__class__(dict(data=2, snapshot=2, feature=2)))
    shard = sharding.state_shardings(mesh, state, p, trainer.STATE_EXTRA_AXES)
    assert shard["params"]["W_enc"].shard_shape(p["W_enc"].shape) == (16, 768, 12288)
