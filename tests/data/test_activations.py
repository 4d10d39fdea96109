"""crossjax.activations against transformers' PyTorch GPT-NeoX: aligned rows, resumption, bad input."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _procs import child_env
import _activations_fixtures as fx
from crossjax import activations, tokens
from crossjax import store as store_lib
from crossjax.errors import CrossjaxError

LAYER = 1  # model.hook = blocks.1.hook_resid_post -> transformers hidden_states[2]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return fx.make_root(tmp_path_factory.mktemp("snaps"))


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """One uninterrupted generation: (config, store url)."""
    config = fx.make_config(root, tmp_path_factory.mktemp("ref") / "store")
    url = activations.ensure_activations(config, None, progress=False)
    return config, url


def test_rows_equal_pytorch_hidden_states(root, reference):
    config, url = reference
    st = store_lib.ActivationStore.open(url)
    assert st.is_complete()
    m = st.meta
    assert (m.snapshots, m.d_model, m.num_rows, m.num_blocks) == (("step0", "step1", "step2"), 32, 300, 10)
    assert m.hook == "blocks.1.hook_resid_post" and m.context_len == 24 and len(set(m.snapshot_hashes)) == 3

    info = tokens.load_tokenizer(root / "step0")
    contexts = tokens.contexts_for(config.tokens, info)
    acts = st.read_rows(0, m.num_rows).astype(np.float32)  # [N, S, D]
    tok = st.read_tokens(0, m.num_rows)
    ctx, pos = tok["context_ids"], tok["positions"]

    # rows are exactly the valid (context, position) pairs, each once, tokens stored beside
    assert sorted(zip(ctx.tolist(), pos.tolist())) == sorted(zip(*map(np.ndarray.tolist, np.nonzero(contexts.valid))))
    np.testing.assert_array_equal(tok["token_ids"], contexts.input_ids[ctx, pos])
    assert np.all(pos > 0) and not np.isin(tok["token_ids"], list(info.special_ids)).any()  # no BOS, pad, special
    # shuffled: the first block mixes the contexts of its group (64 rows, about 4 contexts), out of order
    assert len(set(ctx[:32].tolist())) >= 3 and list(zip(ctx, pos)) != sorted(zip(ctx, pos))

    for s, name in enumerate(m.snapshots):
        ref = fx.hf_hidden(root / name, contexts.input_ids, LAYER)[ctx, pos]  # [N, D]
        scale = np.abs(ref).max()
        np.testing.assert_allclose(acts[:, s], ref, rtol=2e-3, atol=2e-3 * scale)
        assert np.abs(ref).mean() > 0.1  # the comparison is not between near-zero vectors
    # snapshots really differ, so a row mix-up between snapshots would show
    assert np.abs(acts[:, 0] - acts[:, 1]).mean() > 0.1


def test_unshuffled_rows_are_in_order(root, tmp_path):
    config = fx.make_config(root, tmp_path / "store", **{"activations.shuffle": False})
    config.model.snapshots = ["step1"]
    st = store_lib.ActivationStore.open(activations.ensure_activations(config, None, progress=False))
    tok = st.read_tokens(0, st.meta.num_rows)
    contexts = tokens.contexts_for(config.tokens, tokens.load_tokenizer(root / "step1"))
    c, p = np.nonzero(contexts.valid)  # row-major: (context, position) order
    np.testing.assert_array_equal(tok["context_ids"], c)
    np.testing.assert_array_equal(tok["positions"], p)
    ref = fx.hf_hidden(root / "step1", contexts.input_ids, LAYER)[c, p]
    np.testing.assert_allclose(st.read_rows(0, st.meta.num_rows)[:, 0].astype(np.float32), ref,
                               rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_rerun_of_a_complete_store_changes_nothing(reference, capsys):
    config, url = reference
    before = fx.tree_bytes(Path(url))
    mtimes = {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")}
    assert activations.ensure_activations(config, None, progress=False) == url
    assert "to do      0 of 15" in capsys.readouterr().out
    assert fx.tree_bytes(Path(url)) == before
    assert {p: p.stat().st_mtime_ns for p in Path(url).rglob("*")} == mtimes


def test_two_processes_write_the_store_of_one(root, reference, tmp_path):
    config, url = reference
    config = fx.make_config(root, tmp_path / "store")
    for pi in (0, 1):  # each process writes its own groups (g % 2 == pi)
        activations.ensure_activations(config, None, process_index=pi, process_count=2, progress=False)
        if pi == 0:
            st = store_lib.ActivationStore.open(str(tmp_path / "store"))
            missing = st.missing_units()
            assert missing and {b // 2 % 2 for b, _ in missing} == {1}  # 2 blocks per group: odd groups missing
    assert fx.tree_bytes(tmp_path / "store") == fx.tree_bytes(Path(url))


def test_sigkill_then_resume_gives_the_same_store(root, reference, tmp_path):
    config, url = reference
    store = tmp_path / "store"
    cmd = [sys.executable, str(REPO / "tests" / "data" / "_activations_proc.py"),
           f"--config={REPO / 'tests' / '_activations_config.py'}:{root}:{store}", f"--workdir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, done = time.time() + 120, []
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [p.name for p in (store / "done").glob("b*_s*")] if (store / "done").is_dir() else []
            if len(done) >= 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the generator ended before it could be killed: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    st = store_lib.ActivationStore.open(str(store))
    assert 4 <= len(done) and not st.is_complete()
    activations.ensure_activations(fx.make_config(root, store), None, progress=False)
    assert fx.tree_bytes(store) == fx.tree_bytes(Path(url))


def test_command_line_on_one_device(root, reference, tmp_path):
    """`python -m crossjax.activations` in a process with one device (no mesh) writes the same rows."""
    config, url = reference
    store = tmp_path / "store"
    env = child_env(1)
    out = subprocess.run([sys.executable, "-m", "crossjax.activations",
                          f"--config={REPO / 'tests' / '_activations_config.py'}:{root}:{store}",
                          f"--workdir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activations plan" in out.stdout and f"activation store ready: {store}" in out.stdout
    assert "over 1 device" in out.stdout
    a, b = store_lib.ActivationStore.open(str(store)), store_lib.ActivationStore.open(url)
    assert a.meta == b.meta
    for key, value in a.read_tokens(0, 300).items():
        np.testing.assert_array_equal(value, b.read_tokens(0, 300)[key])
    x, y = a.read_rows(0, 300).astype(np.float32), b.read_rows(0, 300).astype(np.float32)
    np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-3)  # one fp16 rounding apart at most


# ---- bad input: a clear error, and the existing store is left exactly as it was


def _bad_configs(root: Path):
    wide = root / "wide"
    if not wide.exists():  # the same tokenizer, another architecture
        fx.save_snapshot(wide, root / "tok" / "tokenizer.json", seed=7, hidden_size=64)
    dup = root / "step1dup"
    if not dup.exists():
        shutil.copytree(root / "step1", dup)
    return {
        "missing snapshot": ({"model.snapshots": ["step0", "step9"]}, "step9.*does not exist"),
        "architectures": ({"model.snapshots": ["step0", "wide"]}, "different architectures.*hidden_size: 32 vs 64"),
        "duplicate weights": ({"model.snapshots": ["step0", "step1", "step1dup"]},
                              "'step1' and 'step1dup' have identical weights"),
        "hook past depth": ({"model.hook": "blocks.3.hook_resid_post"}, "model has 3 layers"),
        "jsonl field": ({"tokens.text_field": "body"}, r"docs\.jsonl line \d+ has no field 'body'.*'id', 'text'"),
        "context too long": ({"tokens.context_len": 65}, "context length 65 exceeds.*max_position_embeddings 64"),
        "other layout": ({"activations.seed": 1}, "extra: stored"),
    }


@pytest.mark.parametrize("case", ["missing snapshot", "architectures", "duplicate weights", "hook past depth",
                                  "jsonl field", "context too long", "other layout"])
def test_bad_input_is_refused_without_damage(root, reference, case):
    config, url = reference
    overrides, msg = _bad_configs(root)[case]
    before = fx.tree_bytes(Path(url))
    with pytest.raises(CrossjaxError, match=msg):
        activations.ensure_activations(fx.make_config(root, Path(url), **overrides), None, progress=False)
    assert fx.tree_bytes(Path(url)) == before


def test_duplicates_allowed_when_asked(root, tmp_path):
    _bad_configs(root)
    config = fx.make_config(root, tmp_path / "store", **{"model.allow_duplicate_weights": True,
                                                         "tokens.num_tokens": 40})
    config.model.snapshots = ["step1", "step1dup"]
    st = store_lib.ActivationStore.open(activations.ensure_activations(config, None, progress=False))
    x = st.read_rows(0, 40)
    np.testing.assert_array_equal(x[:, 0], x[:, 1])


def test_streamed_source_tokenizes_through_the_cache_and_a_rerun_reads_no_documents(root, tmp_path, monkeypatch):
    """tokens.source='hf_dataset' on a directory of jsonl files streams through `datasets`; the activation stage
    keeps the tokens in <store>.tokens, so the rows equal the in-memory contexts and a rerun streams nothing."""
    import json

    from crossjax import documents, document_stream
    data = tmp_path / "dataset"
    data.mkdir()
    lines = (root / "docs.jsonl").read_text().splitlines()
    for i in range(3):  # three data files, as a web corpus comes in many
        (data / f"part-{i}.jsonl").write_text("\n".join(lines[i::3]) + "\n")
    config = fx.make_config(root, tmp_path / "store", **{"tokens.source": "hf_dataset", "tokens.path": str(data)})
    assert documents.is_streamed(config.tokens)
    url = activations.ensure_activations(config, None, progress=False)
    assert Path(url + ".tokens").is_dir()
    st = store_lib.ActivationStore.open(url)
    contexts = tokens.contexts_for(config.tokens, tokens.load_tokenizer(root / "step0"))   # no cache: in memory
    tok = st.read_tokens(0, st.meta.num_rows)
    np.testing.assert_array_equal(tok["token_ids"], contexts.input_ids[tok["context_ids"], tok["positions"]])

    def no_stream(*a, **k):
        raise AssertionError("the rerun opened the dataset")
    monkeypatch.setattr(document_stream, "_load_stream", no_stream)      # datasets.load_dataset(streaming=True)
    monkeypatch.setattr(document_stream.StreamUnits, "read", no_stream)
    assert activations.ensure_activations(config, None, progress=False) == url
    assert json.loads((Path(url) / "meta.json").read_text())["extra"]["tokens"]["source"] == "hf_dataset"
