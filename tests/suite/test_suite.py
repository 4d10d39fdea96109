"""The offline tiny pre-training suite: tokenizer, schedule, build, caching, determinism, resumption, HF parity.

One micro suite is built per module (seconds) and shared; transformers' PyTorch GPT-NeoX is the reference model.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from _procs import child_env
from crossjax import configs
from crossjax import checkpoint
from crossjax.errors import CrossjaxError
from crossjax.suite import corpus, dirs, model, pretrain, token_data, training
from crossjax.suite import tokenizer as tokenizer_lib

REPO = Path(__file__).resolve().parents[2]


def micro(path, **overrides):
    section = configs.suite_config("micro")
    section.dir = str(path)
    section.progress = False
    section.update(overrides)
    return section


def snapshot_tensors(root: Path, name: str) -> dict:
    return load_file(str(root / name / "model.safetensors"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite") / "micro"
    out = pretrain.ensure_suite(micro(root))
    assert out == root
    return root


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_deterministic_and_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    docs = corpus.load_documents("train")[::40]
    a = tokenizer_lib.build_tokenizer(docs, tmp_path / "a", vocab_size=300, model_max_length=64)
    tokenizer_lib.build_tokenizer(docs, tmp_path / "b", vocab_size=300, model_max_length=64)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a.get_vocab_size() == 300
    assert a.token_to_id("<|endoftext|>") == 0 and a.token_to_id("<|padding|>") == 1
    text = "O Romeo, Romeo! wherefore art thou Romeo? And God said, Let there be light: and there was light. é ∑"
    ids = a.encode(text).ids
    assert 0 not in ids and 1 not in ids  # nothing added automatically (no BOS), no unknown bytes
    assert a.decode(ids) == text
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert hf(text)["input_ids"] == ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 0, 1)


def test_tokenizer_rejects_a_vocab_below_the_byte_alphabet():
    with pytest.raises(CrossjaxError, match="at least 258"):
        tokenizer_lib.train_tokenizer(["abc"], vocab_size=100)


# ------------------------------------------------------------------------------------------- config, schedule
def test_snapshot_schedule_is_pythia_like():
    names = pretrain.snapshot_names(configs.suite_config())
    assert names == [f"step{n}" for n in
                     (0, 1, 2, 4, 8, 16, 32, 64, 128, 200, 400, 600, 800, 1000, 1200, 1400, 1600)]
    assert pretrain.snapshot_steps(configs.suite_config("micro")) == [0, 1, 2, 4, 8, 12, 24, 36, 48]
    explicit = micro("/x", snapshots=[0, 5, 48])
    assert pretrain.snapshot_names(explicit) == ["step0", "step5", "step48"]
    with pytest.raises(CrossjaxError, match="snapshots"):
        pretrain.snapshot_steps(micro("/x", snapshots=[0, 60]))


def test_bad_settings_are_named():
    with pytest.raises(CrossjaxError, match="not divisible by suite.heads"):
        pretrain.validate(micro("/x", heads=3))
    with pytest.raises(CrossjaxError, match="Unknown suite keys"):
        pretrain.validate({"d_modle": 8})


def test_chunk_sampler_is_a_function_of_seed_and_step_and_covers_each_epoch():
    stream = np.arange(100 * 4, dtype=np.uint16)
    a = token_data.ChunkSampler(stream, 4, 10, seed=3)
    b = token_data.ChunkSampler(stream, 4, 10, seed=3)
    assert np.array_equal(a.batch(17), b.batch(17))  # random access: no state carried between steps
    epoch0 = np.concatenate([a.batch(s) for s in range(10)])
    assert sorted(epoch0[:, 0] // 4) == list(range(100))  # every chunk exactly once per epoch
    assert not np.array_equal(a.batch(10), a.batch(0))  # the next epoch is reshuffled
    assert not np.array_equal(token_data.ChunkSampler(stream, 4, 10, seed=4).batch(0), a.batch(0))


def test_default_dir_is_named_by_the_config(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSJAX_CACHE", str(tmp_path))
    a, b = micro(""), micro("", steps=40)
    assert pretrain.suite_dir(a) == tmp_path / f"suite-{pretrain.fingerprint(a)[:12]}"
    assert pretrain.suite_dir(b) != pretrain.suite_dir(a)
    assert pretrain.fingerprint(micro("", progress=True)) == pretrain.fingerprint(a)  # display only


# ----------------------------------------------------------------------------------------------- the build
def test_built_suite_layout(built):
    names = pretrain.snapshot_names(micro(built))
    done = json.loads((built / "DONE.json").read_text())
    assert done["fingerprint"] == pretrain.fingerprint(micro(built)) and done["snapshots"] == names
    for name in names:
        files = {p.name for p in (built / name).iterdir()}
        assert {"config.json", "model.safetensors", *tokenizer_lib.TOKENIZER_FILES} <= files
    assert not (built / "state").exists()
    losses = pretrain.read_losses(built)
    assert [r["name"] for r in losses["snapshots"]] == names


def test_transformers_loads_snapshots_with_the_same_logits_as_crossjax(built):
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    from crossjax.models import load as model_load

    tokens = np.load(built / "data" / "heldout.npy")[:64].astype(np.int32).reshape(2, 32)
    for name in ("step0", "step8", "step48"):
        ours = model_load.load_snapshot(str(built / name))
        logits = np.asarray(ours.model(tokens))
        ref = GPTNeoXForCausalLM.from_pretrained(str(built / name)).eval()
        with torch.no_grad():
            want = ref(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(str(built / "step48"))
    assert tok.eos_token_id == ours.config.eos_token_id == 0


def test_heldout_loss_falls_and_matches_an_independent_evaluation(built):
    import torch
    from transformers import GPTNeoXForCausalLM

    section = micro(built)
    records = pretrain.read_losses(built)["snapshots"]
    held = [r["heldout_loss"] for r in records]
    assert held[-1] < held[0] - 0.8, held
    assert all(b <= a + 0.02 for a, b in zip(held, held[1:])), held  # no snapshot is clearly worse than the last
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.8
    # The recorded held-out loss equals PyTorch's loss on the same fixed held-out contexts.
    sample = token_data.eval_sample(np.load(built / "data" / "heldout.npy"), section.context_len, section.eval_contexts)
    for rec in (records[0], records[-1]):
        model = GPTNeoXForCausalLM.from_pretrained(str(built / rec["name"])).eval()
        ids = torch.from_numpy(sample.astype(np.int64))
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert abs(loss - rec["heldout_loss"]) < 1e-4, (rec["name"], loss, rec["heldout_loss"])


def test_a_complete_suite_is_reused_without_training(built, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a complete suite must not be trained again")

    monkeypatch.setattr(training, "train", boom)
    before = (built / "step48" / "model.safetensors").stat().st_mtime_ns
    assert pretrain.ensure_suite(micro(built)) == built
    assert (built / "step48" / "model.safetensors").stat().st_mtime_ns == before


def test_another_config_in_the_same_dir_is_refused_and_nothing_is_touched(built, tmp_path):
    done = (built / "DONE.json").read_bytes()
    with pytest.raises(CrossjaxError, match=r"another config \(steps: 48 -> 40\)"):
        pretrain.ensure_suite(micro(built, steps=40))
    assert (built / "DONE.json").read_bytes() == done
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CrossjaxError, match="not a crossjax suite"):
        pretrain.ensure_suite(micro(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_same_seed_gives_identical_weights(built, tmp_path):
    again = pretrain.ensure_suite(micro(tmp_path / "again"))
    for name in pretrain.snapshot_names(micro(built)):
        a, b = snapshot_tensors(built, name), snapshot_tensors(again, name)
        assert a.keys() == b.keys()
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    assert (built / "losses.json").read_text() == (again / "losses.json").read_text()
    # The comparison can fail: another seed starts from other weights.
    p0 = model.init_params(pretrain.validate(micro(built)))[1]
    p1 = model.init_params(pretrain.validate(micro(built, seed=1)))[1]
    assert not np.array_equal(np.asarray(p0["embed_in"]["embedding"][...]), np.asarray(p1["embed_in"]["embedding"][...]))
    # ... and consecutive snapshots differ (step1 is a real update).
    assert not np.array_equal(snapshot_tensors(built, "step0")["embed_out.weight"],
                              snapshot_tensors(built, "step1")["embed_out.weight"])


def test_a_build_killed_mid_way_resumes_to_the_same_weights(built, tmp_path):
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "suite" / "_suite_build_proc.py"), str(root), "0.25"],
                            cwd=REPO, env=child_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            rec = dirs.read_json(root / "losses.json")
            if rec and rec["snapshots"][-1]["step"] >= 12:  # step 12 saved; steps 13..48 not yet
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    state = checkpoint.Checkpoints(root / training.STATE_DIR, keep=1, async_save=False)
    try:
        assert not (root / "DONE.json").exists() and state.latest_step() is not None  # killed with a checkpoint
    finally:
        state.close()
    assert not (root / "step48").exists()

    pretrain.ensure_suite(micro(root))
    for name in pretrain.snapshot_names(micro(built)):
        a, b = snapshot_tensors(built, name), snapshot_tensors(root, name)
        for k in a:
            assert np.array_equal(a[k], b[k]), (name, k)
    assert pretrain.read_losses(root)["snapshots"] == pretrain.read_losses(built)["snapshots"]


# ------------------------------------------------------------------------------------------------ end to end
def test_micro_pipeline_suite_to_summary(built, tmp_path, monkeypatch):
    """experiments/tiny.py:micro: suite -> activations of 4 snapshots -> crosscoder -> summary.json."""
    from crossjax import pipeline
    from crossjax import store as store_lib
    from crossjax.models import load as model_load
    from crossjax.summary import RunSummary

    monkeypatch.setenv("CROSSJAX_CACHE", str(tmp_path / "cache"))
    config = configs.load_experiment(f"{REPO}/experiments/tiny.py:micro")
    # The experiment's suite settings are the micro preset, and the pipeline (not the experiment) finds the suite
    assert pretrain.fingerprint(config.suite) == pretrain.fingerprint(micro(built))
    assert config.model.path_template == ""
    assert pipeline.bind_suite(config).model.path_template == str(
        tmp_path / "cache" / f"suite-{pretrain.fingerprint(micro(built))[:12]}" / "{snapshot}")
    config.suite.dir = str(built)                     # the suite this module built (reused as is)
    summary = pipeline.run(config, str(tmp_path / "work"))

    on_disk = RunSummary.read(tmp_path / "work")
    assert on_disk.snapshots == ["step0", "step4", "step12", "step48"] == list(config.model.snapshots)
    assert on_disk.steps == 60 and on_disk.heldout["ev_mean"] == pytest.approx(summary.heldout["ev_mean"])
    ev = on_disk.heldout["ev"]
    assert len(ev) == 4 and min(ev) > 0.4, ev  # the crosscoder learned every snapshot (EV about 0.7-0.8)
    assert not (tmp_path / "cache").exists()  # nothing was built outside the given suite dir
    # the paper's analyses ran: separability of sampled features, and the two phases over every snapshot
    assert list(on_disk.evals) == ["heldout", "spliced", "separability", "phases"]
    curves = on_disk.evals["phases"]["curves"]
    assert list(curves) == list(config.model.snapshots)
    assert curves["step48"]["loss"] < curves["step0"]["loss"]          # the model learned from step 0 to 48
    assert curves["step48"]["kl_unigram"] < curves["step0"]["kl_unigram"]
    assert on_disk.evals["phases"]["transition"]["snapshot"] in curves
    assert len(on_disk.evals["separability"]["snapshots"]) == 4
    # complexity of emerging features from their top contexts (the offline scorer), against when they form
    from crossjax import analyze
    assert analyze.main(["analyze", f"--workdir={tmp_path / 'work'}", "--complexity=offline",
                         "--complexity_features=12"]) == 0
    scored = json.loads((tmp_path / "work" / "complexity_offline.json").read_text())
    assert (tmp_path / "work" / "index").exists() and len(scored["scores"]) == len(scored["features"]) > 0
    assert all(1 <= sc["complexity"] <= 5 for sc in scored["scores"])
    assert scored["correlation"]["features"] + scored["correlation"]["failed"] == len(scored["features"])
    # The store holds activations of exactly the suite's snapshots (content hashes of the saved weights).
    store = store_lib.ActivationStore.open(on_disk.store)
    want = [model_load.load_snapshot(str(built / n)).content_hash for n in config.model.snapshots]
    assert list(store.meta.snapshot_hashes) == want
    assert store.meta.hook == "blocks.0.hook_resid_post" and store.meta.d_model == 32
    tokens = store.read_tokens(0, store.meta.num_rows)["token_ids"]
    assert tokens.min() > tokenizer_lib.PAD_ID and tokens.max() < config.suite.vocab_size  # no BOS/padding rows


def test_a_whole_config_is_checked_against_the_suite_before_any_work(tmp_path, monkeypatch):
    from crossjax import pipeline

    monkeypatch.setenv("CROSSJAX_CACHE", str(tmp_path))
    config = configs.load_experiment(f"{REPO}/experiments/tiny.py:micro")
    stale = str(pretrain.suite_dir(config.suite) / "{snapshot}")   # the suite's path before the override
    config.suite.steps = 40  # a command-line override: the snapshots listed are no longer all saved
    with pytest.raises(CrossjaxError, match=r"model.snapshots has \['step12', 'step48'\]"):
        pipeline.bind_suite(config)
    with pytest.raises(CrossjaxError, match=r"model.snapshots has \['step12', 'step48'\]"):
        pipeline.run(config, str(tmp_path / "work"))
    config.model.snapshots = ["step0", "step40"]
    config.model.path_template = stale                 # a path given by hand that no longer fits
    with pytest.raises(CrossjaxError, match="does not point into the suite") as e:
        pretrain.ensure_suite(config)
    assert str(pretrain.suite_dir(config.suite) / "{snapshot}") in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing built, no workdir made
