"""crossjax.plan and crossjax.memory_plan: the memory plan of the real training step on simulated meshes, checked
against the closed-form sizes of the crosscoder and Adam; a plan that cannot fit is refused with one that does."""
import json
import math
import subprocess
import sys
import textwrap

import jax
import pytest
from _procs import child_env
from _trainer_util import ROOT, experiment

from crossjax import config_checks, memory_plan, plan, sharding, trainer
from crossjax.errors import CrossjaxError
from crossjax.models import gpt_neox

F32 = 4


def closed_form(config, mesh: dict) -> dict:
    """Per-device bytes of the parameters (W_enc S*D*F, W_dec S*F*D, b_enc F, b_dec S*D, log_threshold F) and of
    Adam's mu and nu of each, all float32, split by the mesh."""
    s = config_checks.num_snapshots(config) // mesh["snapshot"]
    f = int(config.crosscoder.num_features) // mesh["feature"]
    d = int(config.data.d_model)
    params = F32 * (s * d * f + s * f * d + f + s * d + f)
    return dict(params=params, adam=2 * params)


def check_against_closed_form(config, p: dict) -> None:
    want = closed_form(config, p["mesh"])
    assert p["params"] == want["params"]
    assert 0 <= p["opt_state"] - want["adam"] <= 64        # plus Adam's step counters
    rows, snaps = p["batch_size"] // p["mesh"]["data"], p["num_snapshots"] // p["mesh"]["snapshot"]
    assert p["batch"] == rows * snaps * p["d_model"] * 2 + p["num_snapshots"] * F32   # float16 rows, the scales
    # XLA's own count of the inputs agrees (no padding on CPU); the total adds the temporaries, at least a gradient
    assert p["arguments"] == p["params"] + p["opt_state"] + p["other_state"] + p["batch"]
    assert p["temporaries"] >= p["params"] and p["total"] >= p["arguments"] + p["temporaries"]


def run_plan(*args, devices=1, timeout=240):
    return subprocess.run([sys.executable, "-m", "crossjax.plan", *args], cwd=ROOT, env=child_env(devices),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("name,variant,mesh", [
    ("pythia160m", "x32", {}),                                   # the config's mesh: all 8 devices data parallel
    ("pythia160m", "x128", {"data": 2, "snapshot": 2, "feature": 2}),
    ("pythia6_9b", None, {}),                                    # its mesh: the features over 8 devices
])
def test_eight_devices_plan_the_papers_shapes_in_closed_form(name, variant, mesh):
    c = experiment(name, variant)
    for k, v in mesh.items():
        c.mesh[k] = v
    planner = plan.ConfigPlanner(c, jax.devices())
    p = planner.plan(sharding.mesh_shape(c.mesh, 8), int(c.train.batch_size)).to_dict()
    assert math.prod(p["mesh"].values()) == 8
    check_against_closed_form(c, p)


def test_sixty_four_simulated_devices_through_the_command():
    """The command on 64 devices (it sets its own device count), for both paper models; JSON output."""
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from crossjax import plan
        out = []
        for args in (["--config=experiments/pythia160m.py:x32", "--config.mesh.feature=8"],
                     ["--config=experiments/pythia160m.py:x128", "--config.mesh.snapshot=4", "--config.mesh.feature=4"],
                     ["--config=experiments/pythia6_9b.py", "--config.mesh.snapshot=2"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = plan.main(["plan", *args, "--devices=64", "--accelerator=v5p", "--format=json"])
            out.append(dict(code=code, result=json.loads(buf.getvalue())))
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    meshes = [{"data": 8, "snapshot": 1, "feature": 8}, {"data": 4, "snapshot": 4, "feature": 4},
              {"data": 4, "snapshot": 2, "feature": 8}]
    for (name, variant), mesh, got in zip([("pythia160m", "x32"), ("pythia160m", "x128"), ("pythia6_9b", None)],
                                          meshes, results):
        assert got["code"] == 0 and got["result"]["fits"] and got["result"]["budget"]["name"] == "v5p"
        p = got["result"]["plan"]
        assert p["mesh"] == mesh
        check_against_closed_form(experiment(name, variant), p)


def test_a_plan_that_cannot_fit_is_refused_with_the_smallest_mesh_that_fits():
    """The paper's 160M run with every device data parallel needs 22.6 GiB per device: a v5e-8 has 16."""
    r = run_plan("--config=experiments/pythia160m.py:x32", "--accelerator=v5e-8")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "does NOT fit" in r.stdout and "total" in r.stdout
    message = r.stderr.strip().splitlines()[-1]
    assert message.startswith("crossjax.plan: error: the plan does not fit") and "v5e" in message
    assert "It fits on the same 8 devices" in message
    suggested = message.rsplit(": ", 1)[1].split()
    assert all(s.startswith("--config.mesh.") for s in suggested)
    # the suggested mesh does fit a v5e (planned here, in this process's 8 devices)
    c = experiment("pythia160m", "x32")
    for flag in suggested:
        key, value = flag.removeprefix("--config.mesh.").split("=")
        c.mesh[key] = int(value)
    p = plan.ConfigPlanner(c, jax.devices()).plan(sharding.mesh_shape(c.mesh, 8), 4096)
    budget = memory_plan.accelerator_budget("v5e", num_devices=8)
    assert p.fits(budget) and p.mesh["data"] < 8


def test_no_mesh_of_eight_v5e_holds_the_6_9b_run_so_it_names_more_devices():
    r = run_plan("--config=experiments/pythia6_9b.py", "--accelerator=v5e-8")
    assert r.returncode == 2
    message = r.stderr.strip().splitlines()[-1]
    assert "It fits on 16 devices (a v5e-16) at batch 4096" in message and "--devices=16" in message, message
    assert "with batch" not in message   # parameters, Adam state and gradients alone exceed a v5e: no batch helps


def test_when_nothing_within_reach_fits_the_refusal_says_what_would_help():
    """The 6.9B run on one v5e: no mesh of up to 8 devices and no smaller batch holds it (none is even compiled:
    parameters, Adam state and a gradient alone exceed each candidate's budget)."""
    c = experiment("pythia6_9b")
    c.mesh.feature = 1
    planner = plan.ConfigPlanner(c, jax.devices())
    p = planner.plan((1, 1, 1), 4096)
    budget = memory_plan.accelerator_budget("v5e", num_devices=1)
    assert not p.fits(budget)
    assert plan.find_fitting(planner, p, budget) == [] and planner.compiles == 1
    message = plan.refusal(p, budget, [], True, planner.compiles)
    assert "no mesh of 1 to 8 devices and no batch down to 256 fits" in message
    assert "Use an accelerator with more memory, more devices, or fewer crosscoder.num_features" in message


def test_the_trainer_check_refuses_a_step_larger_than_the_devices_before_allocating():
    """On this machine's 8 CPU devices the 160M run (22.6 GiB per device) exceeds the memory they share."""
    c = experiment("pythia160m", "x32")
    planner = plan.ConfigPlanner(c, jax.devices())
    shard = planner.shardings((8, 1, 1))
    step = trainer.make_train_step(planner.cc_cfg, planner.tx, c, planner.steps, shard)
    budget = memory_plan.device_budget(jax.devices())
    assert budget.memory * 8 < 8 * 22 * memory_plan.GiB   # this machine has less than 8 x 22 GiB
    with pytest.raises(CrossjaxError, match=r"needs 22\.\d+ GiB per device .* nothing was allocated.*crossjax\.plan"):
        memory_plan.check_before_training(step, planner.abstract, shard, batch_size=4096, store_dtype="float16")


def test_pythia70m_loads_validates_and_plans_on_one_device():
    c = experiment("pythia70m")
    assert c.model.repo == "EleutherAI/pythia-70m" and len(c.model.snapshots) < 32
    assert c.train.num_tokens < experiment("pythia160m").train.num_tokens
    config_checks.validate(c, num_devices=8)
    config_checks.validate(c, num_devices=1)
    pythia70m = gpt_neox.NeoXConfig(vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8,
                                    intermediate_size=2048, max_position_embeddings=2048)
    assert gpt_neox.parse_hook(pythia70m, c.model.hook) == (3, "hook_resid_post")
    gpt_neox.validate_context_len(pythia70m, c.tokens.context_len)
    assert c.data.d_model == pythia70m.hidden_size
    p = plan.ConfigPlanner(c, jax.devices()).plan((1, 1, 1), int(c.train.batch_size))
    check_against_closed_form(c, p.to_dict())
    assert p.fits(memory_plan.accelerator_budget("h100", num_devices=1))


PYTHIA70M_PARAMS = 70_426_624   # EleutherAI/pythia-70m, embeddings included


def test_an_on_the_fly_plan_counts_the_snapshot_models_from_their_config_json(tmp_path, capsys, monkeypatch):
    """experiments/pythia70m.py trains on the fly: its 8 snapshots stay on the devices beside the step. The plan reads
    their architecture from config.json alone (here local directories without weights) and counts them."""
    from huggingface_hub import constants
    arch = gpt_neox.NeoXConfig(vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048,
                               max_position_embeddings=2048)
    c = experiment("pythia70m")
    assert c.data.on_the_fly
    for name in c.model.snapshots:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    monkeypatch.chdir(ROOT)
    common = ["plan", "--config=experiments/pythia70m.py", "--format=json", "--nosearch",
              f"--config.model.path_template={tmp_path}/{{snapshot}}"]
    plan.main(common + ["--devices=1", "--accelerator=h100"])
    one = json.loads(capsys.readouterr().out)
    assert one["plan"]["resident"] == 8 * PYTHIA70M_PARAMS * F32        # every weight, float32, on the one device
    assert one["plan"]["total"] >= one["plan"]["arguments"] + one["plan"]["temporaries"] + one["plan"]["resident"]
    assert one["fits"]
    # eight devices on two hosts: each host spreads the models over its 4 devices, every matrix split 4 ways and
    # the biases and LayerNorms (6 layers x (3*512 + 512 + 2048 + 512 + 4*512) + the final 2*512) whole
    plan.main(common + ["--devices=8", "--hosts=2"])
    split = json.loads(capsys.readouterr().out)
    vectors = 6 * (3 * 512 + 512 + 2048 + 512 + 4 * 512) + 2 * 512
    assert split["plan"]["resident"] == 8 * F32 * ((PYTHIA70M_PARAMS - vectors) // 4 + vectors)
    # no config.json to read (the Hub offline, nothing cached): one line naming what the plan needs
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        plan.main(["plan", "--config=experiments/pythia70m.py", "--devices=1",
                   f"--config.model.cache_dir={tmp_path / 'empty'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "counts them from the first snapshot's config.json" in err and "EleutherAI/pythia-70m@step0" in err, err


def test_pythia6_9b_is_the_papers_run():
    c = experiment("pythia6_9b")
    paper = experiment("pythia160m")
    assert (c.model.repo, c.model.hook, c.data.d_model, c.crosscoder.num_features) == \
        ("EleutherAI/pythia-6.9b", "blocks.16.hook_resid_post", 4096, 32768)
    assert (c.train.lr, c.train.threshold_lr_scale) == (1e-5, 0.3)
    assert list(c.model.snapshots) == list(paper.model.snapshots)   # the same 32 revisions
    config_checks.validate(c, num_devices=8)


@pytest.mark.parametrize("args,fragment", [
    (["--config=experiments/pythia160m.py", "--accelerator=v5q"], "unknown accelerator 'v5q': use one of v4, v5e"),
    (["--config=experiments/pythia160m.py", "--accelerator=v5p-32", "--devices=8"],
     "--accelerator=v5p-32 has 16 devices but --devices=8"),
    (["--config=experiments/pythia160m.py", "--accelerator=v5p-31"], "2 per chip; use a multiple of 2"),
    (["--config=experiments/pythia160m.py"], "give the mesh size: --devices=N"),
    (["--config=experiments/pythia160m.py", "--devices=8", "--config.train.lrr=1"],
     "unknown config key config.train.lrr"),
    (["--config=experiments/nope.py", "--devices=8"], "experiment file 'experiments/nope.py' does not exist"),
    (["--devices=8"], "--config is required"),
])
def test_bad_arguments_are_one_line_and_exit_code_2(args, fragment, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        plan.main(["plan", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("crossjax.plan: error: ") and fragment in err, err


def test_a_snapshot_store_without_d_model_cannot_be_planned():
    c = experiment("pythia160m")
    c.data.d_model = 0
    with pytest.raises(CrossjaxError, match=r"data\.d_model=0: the plan does not open the store.*hidden_size"):
        plan.store_shape(c)


@pytest.mark.parametrize("spec,name,devices", [("v5e", "v5e", None), ("v5e-8", "v5e", 8), ("v5p-32", "v5p", 16),
                                               ("v4-8", "v4", 4), ("8xh100", "h100", 8), ("H200", "h200", None)])
def test_accelerator_names(spec, name, devices):
    acc, n = memory_plan.parse_accelerator(spec)
    assert (acc.name, n) == (name, devices)


def test_mesh_candidates_split_the_model_least_first():
    meshes = plan.mesh_candidates(8, 32, 24576, 4096)
    assert meshes[0] == (8, 1, 1) and meshes[1] == (4, 1, 2) and (1, 8, 1) in meshes
    assert all(d * s * f == 8 for d, s, f in meshes)
    assert (1, 1, 8) not in plan.mesh_candidates(8, 32, 100, 4096)   # 8 does not divide F = 100


def test_a_process_whose_backend_has_fewer_devices_plans_in_a_fresh_one(capfd, monkeypatch):
    """This process runs 8 devices; a plan for 16 cannot change that, so the command runs in a child process."""
    monkeypatch.chdir(ROOT)
    assert jax.device_count() == 8   # the backend is up
    code = plan.main(["plan", "--config=experiments/pythia70m.py", "--devices=16", "--accelerator=h100",
                      "--config.data.on_the_fly=False"])   # (on the fly, the plan would read the Hub's config.json)
    out = capfd.readouterr().out
    assert code == 0 and "compiled for 16 simulated cpu devices" in out and "mesh data=16" in out, out
    assert jax.device_count() == 8
