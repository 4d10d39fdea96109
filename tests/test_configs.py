"""crossjax.configs: the locked base config, validation messages, and reading the experiment files."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from _procs import child_env
from _trainer_util import ROOT, experiment

from crossjax import config_checks, configs, sharding, trainer
from crossjax.errors import CrossjaxError
from crossjax.models import gpt_neox

# Every shipped experiment with each variant its docstring names (None: get_config() without one).
VARIANTS = {"synthetic": (None, "quick", "default", "tiny"), "tiny": (None, "default", "micro"),
            "pythia160m": (None, "x32", "x64", "x128"), "pythia6_9b": (None,), "pythia70m": (None,)}
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "tensorstore", "transformers", "torch")


def _specs() -> list[str]:
    return [f"experiments/{name}.py" + (f":{v}" if v else "") for name, vs in VARIANTS.items() for v in vs]


def test_base_config_has_every_section_and_is_locked():
    c = configs.base_config()
    assert set(c.keys()) == {"store", "planted", "model", "tokens", "activations", "suite", "crosscoder",
                             "data", "train", "mesh", "eval", "evals"}
    # The defaults are the paper's run (PAPER.md): its experiment keeps every optimisation and crosscoder default.
    paper = experiment("pythia160m")
    optimisation = ("batch_size", "lr", "threshold_lr_scale", "b1", "b2", "warmup_steps", "cooldown_frac",
                    "sparsity_coef", "sparsity_warmup_frac", "compute_dtype")
    assert {k: paper.train[k] for k in optimisation} == {k: c.train[k] for k in optimisation}
    assert paper.crosscoder.to_dict() == c.crosscoder.to_dict()
    # By default every device goes to the data axis.
    assert sharding.mesh_shape(c.mesh, 8) == (8, 1, 1) and sharding.mesh_shape(c.mesh, 1) == (1, 1, 1)
    with pytest.raises(AttributeError) as e:
        c.train.lrr = 1
    assert 'Did you mean "lr"' in str(e.value) and "batch_size" in str(e.value) and "heldout_blocks" in str(e.value)
    with pytest.raises(TypeError):
        c.train.batch_size = "many"  # types are checked on assignment too


def test_suite_presets_and_a_typo():
    micro, default = configs.suite_config("micro"), configs.suite_config("default")
    assert micro.keys() == default.keys() and micro.d_model < default.d_model and micro.steps < default.steps
    assert configs.base_config().suite.to_dict() == default.to_dict()
    with pytest.raises(CrossjaxError, match="Unknown suite preset 'big': use 'default' or 'micro'"):
        configs.suite_config("big")


def test_experiments_build_their_configs_without_jax_or_io():
    """Loading every experiment and variant imports no JAX, Flax, tensorstore or transformers (in a fresh process:
    this one imported JAX in conftest)."""
    code = textwrap.dedent(f"""
        import json, sys
        from crossjax import configs
        loaded = [configs.load_experiment(spec).to_json_best_effort() for spec in {_specs()!r}]
        heavy = sorted({{m for m in sys.modules if m.split(".")[0] in {HEAVY!r}}})
        print(json.dumps(dict(loaded=len(loaded), heavy=heavy)))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == dict(loaded=len(_specs()), heavy=[])


@pytest.mark.parametrize("variant", ["default", "micro"])
def test_tiny_leaves_the_suite_paths_to_the_pipeline(variant):
    from crossjax.suite import pretrain

    c = experiment("tiny", variant)
    assert c.suite.enabled and c.model.path_template == ""
    assert set(c.model.snapshots) <= set(pretrain.snapshot_names(c.suite))  # the snapshots its suite saves
    assert c.data.d_model == c.suite.d_model and c.tokens.context_len == c.suite.context_len


def test_load_experiment_names_each_problem_and_its_fix(tmp_path):
    def write(name, text):
        (tmp_path / name).write_text(textwrap.dedent(text))
        return str(tmp_path / name)

    with pytest.raises(CrossjaxError, match="experiment file .*nope.py' does not exist"):
        configs.load_experiment(str(tmp_path / "nope.py") + ":quick")
    broken = write("broken.py", """\
        from crossjax import configs

        def get_config(arg=None)
            return configs.base_config()
    """)
    with pytest.raises(CrossjaxError, match=r"broken.py line 3 is not valid Python"):
        configs.load_experiment(broken)
    with pytest.raises(CrossjaxError, match="defines no get_config"):
        configs.load_experiment(write("empty.py", "X = 1\n"))
    with pytest.raises(CrossjaxError, match="returned dict, not a ConfigDict"):
        configs.load_experiment(write("plain.py", "def get_config(arg=None):\n    return {'train': {}}\n"))
    no_variant = write("fixed.py", "from crossjax import configs\n\ndef get_config():\n    return configs.base_config()\n")
    assert configs.load_experiment(no_variant).train.lr == configs.base_config().train.lr
    with pytest.raises(CrossjaxError, match="takes no variant"):
        configs.load_experiment(no_variant + ":x")
    with pytest.raises(CrossjaxError, match="needs a variant"):
        configs.load_experiment(write("needs.py", "def get_config(arg):\n    raise AssertionError\n"))
    with pytest.raises(CrossjaxError, match="^no such size 'x'$"):  # an experiment's ValueError, as it is
        configs.load_experiment(write("sizes.py", "def get_config(arg):\n    raise ValueError(f'no such size {arg!r}')\n")
                                + ":x")


def test_a_variant_typo_keeps_the_experiments_message():
    for name, choices in [("synthetic", "quick, default or tiny"), ("tiny", "default or micro"),
                          ("pythia160m", "one of ['x128', 'x32', 'x64']")]:
        with pytest.raises(CrossjaxError) as e:
            experiment(name, "nope")
        assert str(e.value) == f"unknown variant 'nope' of {name}.py: use {choices}"


def test_the_variant_is_everything_after_the_first_colon():
    """As the --config flag reads it: tests/_activations_config.py:<root>:<store>."""
    c = configs.load_experiment(os.path.join(ROOT, "tests", "_activations_config.py") + ":/r:/s")
    assert c.model.path_template == os.path.join("/r", "{snapshot}") and c.store.path == "/s"


def test_unknown_key_on_the_command_line_fails_with_the_valid_keys(tmp_path):
    env = child_env(1)
    r = subprocess.run([sys.executable, "-m", "crossjax.train", "--config=experiments/synthetic.py:tiny",
                        "--config.train.lrr=1", f"--workdir={tmp_path / 'w'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "lrr" in r.stderr and "lr" in r.stderr and "batch_size" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # nothing was created


def test_validate_accepts_the_shipped_experiments():
    for name, variants in VARIANTS.items():
        for variant in variants:
            config_checks.validate(experiment(name, variant), num_devices=8)


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
    c = experiment("synthetic", "tiny")
    edit(c)
    with pytest.raises(CrossjaxError) as e:
        config_checks.validate(c, num_devices=8)
    assert fragment in str(e.value)


def test_validate_lists_all_problems_at_once():
    c = experiment("synthetic", "tiny")
    c.train.batch_size = 100
    c.train.lr = -1.0
    with pytest.raises(CrossjaxError) as e:
        config_checks.validate(c, num_devices=8)
    assert "batch_size=100" in str(e.value) and "train.lr=-1.0" in str(e.value)


def test_pythia160m_fits_pythia_and_builds_the_papers_abstract_state():
    c = experiment("pythia160m")
    steps = [int(name.removeprefix("step")) for name in c.model.snapshots]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 143000  # revisions in training order
    assert c.model.repo == "EleutherAI/pythia-160m"
    # Pythia-160m's architecture: the hook is the paper's layer 6, the contexts fit its positions, D is its width.
    pythia = gpt_neox.NeoXConfig(vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12,
                                 intermediate_size=3072, max_position_embeddings=2048)
    assert gpt_neox.parse_hook(pythia, c.model.hook) == (6, "hook_resid_post")
    gpt_neox.validate_context_len(pythia, c.tokens.context_len)
    assert c.data.d_model == pythia.hidden_size
    steps = math.ceil(c.train.num_tokens / c.train.batch_size)
    cc, tx, state = trainer.abstract_train_state(c, num_snapshots=config_checks.num_snapshots(c),
                                                 d_model=c.data.d_model, total_steps=steps)
    p = state["params"]
    # the paper's crosscoder: 32 snapshots, d_model 768, F = 24,576 (expansion 32)
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
