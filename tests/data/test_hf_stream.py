"""Token contexts from a streamed Hugging Face dataset (local data files through datasets' real streaming path),
sharded over processes and resumed through the token cache; and the same contexts for random-access sources."""

import collections
import dataclasses
import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")  # the test extra installs it

from crossjax import configs, document_stream, token_cache, tokens  # noqa: E402
from crossjax.errors import CrossjaxError  # noqa: E402

BOS, PAD, EOS, SPECIAL = 1, 0, 2, 3
FILES, DOCS_PER_FILE, WINDOW = 40, 30, 10


def int_tokenizer(text: str) -> list[int]:
    """Hand-made tokenizer: the text is its token ids."""
    return [int(w) for w in text.split()]


INFO = tokens.TokenizerInfo(tokenizer=int_tokenizer, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                            special_ids=frozenset({SPECIAL}), vocab_size=60, sha256="int")


def random_docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(str(x) for x in rng.integers(3, 60, size=rng.integers(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of FILES jsonl data files (a dataset far larger than the contexts need); its raw documents."""
    root = tmp_path_factory.mktemp("stream")
    raw = []
    for f in range(FILES):
        docs = random_docs(DOCS_PER_FILE, seed=f)
        (root / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": d, "n": i}) + "\n"
                                                           for i, d in enumerate(docs)))
        raw.append(docs)
    return root, raw


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    monkeypatch.setattr(document_stream, "STREAM_WINDOW_DOCS", WINDOW)  # several parts per data file
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # nothing here may reach the network


@pytest.fixture
def pulled(monkeypatch):
    """Counts documents the datasets stream delivers, and which units each read started."""
    count = collections.Counter()
    iterate = datasets.IterableDataset.__iter__

    def counting(self):
        for record in iterate(self):
            count["docs"] += 1
            yield record

    read = document_stream.StreamUnits.read

    def reading(self, unit, start=0):
        count[("unit", unit)] += 1
        return read(self, unit, start)

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counting)
    monkeypatch.setattr(document_stream.StreamUnits, "read", reading)
    return count


def section(path, **kw):
    s = configs.tokens_config()
    s.update(dict(source="hf_dataset", path=str(path), context_len=8, num_tokens=300, packing=False, seed=3))
    s.update(kw)
    return s


def units_read(count) -> list[int]:
    return sorted(k[1] for k in count if isinstance(k, tuple))


def test_stream_follows_the_documented_order_and_reads_only_the_prefix(corpus, pulled):
    root, raw = corpus
    c = tokens.contexts_for(section(root), INFO)
    # the documented rule, from the raw files: shards in a seeded permutation, windows shuffled inside each
    seed, want = 3, []
    for shard in np.random.default_rng(seed).permutation(FILES):
        for w in range(0, DOCS_PER_FILE, WINDOW):
            perm = np.random.default_rng((seed, shard, w // WINDOW)).permutation(WINDOW)
            want += [(shard * document_stream.DOC_ID_STRIDE + w + i, raw[shard][w + i]) for i in perm]
    assert c.num_valid == 300
    for row, doc in enumerate(c.doc_ids.tolist()):  # no packing: context k is the k-th document of the order
        assert doc == want[row][0]
        ids = [BOS, *int_tokenizer(want[row][1])][:8]
        np.testing.assert_array_equal(c.input_ids[row, :len(ids)], ids)
    # (a) only the needed prefix is read: the documents used, rounded up to a window, of 1200
    assert c.num_contexts <= pulled["docs"] < c.num_contexts + WINDOW
    assert len(units_read(pulled)) == -(-pulled["docs"] // DOCS_PER_FILE) < FILES // 4


@pytest.mark.parametrize("packing", [False, True])
def test_two_hosts_make_the_contexts_of_one(corpus, pulled, tmp_path, packing):
    root, _ = corpus
    s = section(root, packing=packing, num_tokens=700)
    one = tokens.contexts_for(s, INFO)
    alone = pulled["docs"]
    pulled.clear()
    # host 1 first: it tokenizes its units, then cannot assemble without host 0's (no waiting here)
    with pytest.raises(CrossjaxError, match=r"unit 0 .*tokenized by process 0 of 2\) are missing from .*run the "
                                            r"same command on every process"):
        tokens.contexts_for(s, INFO, cache_dir=tmp_path, process_index=1, process_count=2, wait_s=0)
    host1 = units_read(pulled)
    pulled.clear()
    c0 = tokens.contexts_for(s, INFO, cache_dir=tmp_path, process_index=0, process_count=2, wait_s=0)
    host0, docs0 = units_read(pulled), pulled["docs"]
    pulled.clear()
    c1 = tokens.contexts_for(s, INFO, cache_dir=tmp_path, process_index=1, process_count=2, wait_s=0)
    assert pulled["docs"] == 0  # its share was already tokenized: nothing read again
    for c in (c0, c1):
        np.testing.assert_array_equal(c.input_ids, one.input_ids)
        np.testing.assert_array_equal(c.valid, one.valid)
        np.testing.assert_array_equal(c.doc_ids, one.doc_ids)
        assert c.fingerprint() == one.fingerprint()
    # each host read only its own units, and host 0 (which saw host 1's work) about half of what one host reads
    assert all(u % 2 == 1 for u in host1) and all(u % 2 == 0 for u in host0) and host0 and host1
    assert docs0 < 0.75 * alone


def test_interrupted_tokenization_resumes_from_the_recorded_position(corpus, pulled, tmp_path, monkeypatch):
    root, _ = corpus
    s = section(root, num_tokens=700)
    want = tokens.contexts_for(s, INFO)
    total = pulled["docs"]
    pulled.clear()

    calls = []

    def dying_tokenizer(text):  # killed in the middle of the fifth window (second data file)
        calls.append(text)
        if len(calls) == 4 * WINDOW + 5:
            raise KeyboardInterrupt
        return int_tokenizer(text)

    info = dataclasses.replace(INFO, tokenizer=dying_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        tokens.contexts_for(s, info, cache_dir=tmp_path)
    assert pulled["docs"] == 5 * WINDOW
    pulled.clear()
    got = tokens.contexts_for(s, INFO, cache_dir=tmp_path)
    # the four finished windows (one whole data file and one window of the next) are not streamed again
    assert pulled["docs"] == total - 4 * WINDOW
    assert got.fingerprint() == want.fingerprint()
    np.testing.assert_array_equal(got.doc_ids, want.doc_ids)
    pulled.clear()

    def no_network(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    again = tokens.contexts_for(s, INFO, cache_dir=tmp_path)  # a finished stage does not even open the dataset
    assert pulled["docs"] == 0 and again.fingerprint() == want.fingerprint()
    with pytest.raises(CrossjaxError, match="could not be reached"):  # (the dataset is indeed out of reach)
        tokens.contexts_for(s, INFO)


def test_damaged_cache_part_is_named_with_the_fix(corpus, tmp_path):
    root, _ = corpus
    s = section(root, num_tokens=100)
    want = tokens.contexts_for(s, INFO, cache_dir=tmp_path)
    part = sorted(tmp_path.glob("tokens-*/unit-000000/part-*.npz"))[0]
    part.write_bytes(part.read_bytes()[:40])  # torn
    with pytest.raises(CrossjaxError, match=rf"{part.name} is unreadable .*delete it: the next run tokenizes"):
        tokens.contexts_for(s, INFO, cache_dir=tmp_path)
    part.unlink()  # the fix the message gives
    assert tokens.contexts_for(s, INFO, cache_dir=tmp_path).fingerprint() == want.fingerprint()


def test_token_cache_at_a_kvstore_url(corpus, pulled, tmp_path):
    """The cache is any kvstore URL (memory:// here, as gs:// on a pod): hosts need no shared disk."""
    s = section(corpus[0], num_tokens=200)
    want = tokens.contexts_for(s, INFO)
    url = f"memory://{tmp_path.name}/store.tokens"
    with pytest.raises(CrossjaxError, match="missing from memory://"):
        tokens.contexts_for(s, INFO, cache_dir=url, process_index=1, process_count=2, wait_s=0)
    got = tokens.contexts_for(s, INFO, cache_dir=url, process_index=0, process_count=2, wait_s=0)
    assert got.fingerprint() == want.fingerprint()
    assert not list(tmp_path.iterdir())  # nothing went to the local disk


def test_unreachable_dataset_names_the_fix():
    with pytest.raises(CrossjaxError, match=r"the dataset 'cerebras/SlimPajama-627B' could not be reached.*"
                                            r"save_to_disk.*--config.tokens.path"):
        tokens.contexts_for(section("cerebras/SlimPajama-627B"), INFO)


def test_stream_errors_name_field_and_split(corpus):
    root, _ = corpus
    with pytest.raises(CrossjaxError, match=r"no field 'body' \(fields: \['text', 'n'\]\)"):
        tokens.contexts_for(section(root, text_field="body"), INFO)
    with pytest.raises(CrossjaxError, match=r"no split 'heldout'.*--config.tokens.split"):
        tokens.contexts_for(section(root, split="heldout"), INFO)
    with pytest.raises(CrossjaxError, match=r"only \d+ usable tokens but tokens.num_tokens=100000"):
        tokens.contexts_for(section(root, num_tokens=100_000), INFO)


# ---- random-access sources: the same contexts as before, also sharded and cached

PINNED = {  # fingerprints (first 16 hex digits) of these contexts as stores made before streaming recorded them
    ("jsonl", False, 0): "ec07a0967a4b62d3", ("jsonl", False, 7): "6682bf0962d1b98c",
    ("jsonl", True, 0): "00af45c9dc43422b", ("jsonl", True, 7): "ec4cd51dcf62faae",
}


@pytest.mark.parametrize("packing, seed", [(False, 0), (False, 7), (True, 0), (True, 7)])
def test_random_access_contexts_unchanged_and_shardable(tmp_path, monkeypatch, packing, seed):
    rng = np.random.default_rng(123)
    docs = [" ".join(str(x) for x in rng.integers(3, 60, size=rng.integers(1, 40))) for _ in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "docs.txt").write_text("\n<|endoftext|>\n".join(docs))
    pinned = PINNED[("jsonl", packing, seed)]
    for source, name in (("jsonl", "docs.jsonl"), ("text", "docs.txt")):
        s = section(tmp_path / name, source=source, packing=packing, seed=seed, context_len=16, num_tokens=2500)
        assert tokens.contexts_for(s, INFO).fingerprint()[:16] == pinned
    monkeypatch.setattr(document_stream, "PART_DOCS", 16)  # many units: three processes share them
    s = section(tmp_path / "docs.jsonl", source="jsonl", packing=packing, seed=seed, context_len=16,
                num_tokens=2500)
    cache = tmp_path / "cache"
    for p in (2, 1):  # the last process would wait for the others: they run first
        with pytest.raises(CrossjaxError, match="missing from"):
            tokens.contexts_for(s, INFO, cache_dir=cache, process_index=p, process_count=3, wait_s=0)
    got = tokens.contexts_for(s, INFO, cache_dir=cache, process_index=0, process_count=3, wait_s=0)
    assert got.fingerprint()[:16] == pinned


def test_waiting_process_reads_parts_as_they_arrive(corpus, tmp_path, monkeypatch):
    """With several processes, a missing share is waited for (polling) rather than failing at once."""
    root, _ = corpus
    s = section(root, num_tokens=200)
    want = tokens.contexts_for(s, INFO)
    writes = []
    sleep = token_cache.time.sleep

    def other_process_meanwhile(seconds):  # while process 1 waits, process 0 tokenizes its share
        if not writes:
            writes.append(tokens.contexts_for(s, INFO, cache_dir=tmp_path, process_index=0, process_count=2,
                                              wait_s=0))
        sleep(0)

    monkeypatch.setattr(token_cache.time, "sleep", other_process_meanwhile)
    got = tokens.contexts_for(s, INFO, cache_dir=tmp_path, process_index=1, process_count=2, wait_s=30)
    assert writes and got.fingerprint() == writes[0].fingerprint() == want.fingerprint()


@pytest.mark.parametrize("packing", [False, True])
def test_cached_contexts_equal_in_memory_ones_for_every_target(tmp_path, monkeypatch, packing):
    """Wherever num_tokens ends, the cache holds what the contexts need (with packing: the documents after the
    target that complete the last context)."""
    docs = random_docs(200, seed=9)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    monkeypatch.setattr(document_stream, "PART_DOCS", 4)
    for n in range(40, 80):
        s = section(tmp_path / "docs.jsonl", source="jsonl", packing=packing, context_len=16, num_tokens=n)
        want = tokens.contexts_for(s, INFO)
        got = tokens.contexts_for(s, INFO, cache_dir=tmp_path / "cache")
        assert got.fingerprint() == want.fingerprint(), n


def test_cache_of_a_source_whose_shards_changed_is_refused(corpus, tmp_path):
    s = section(corpus[0], num_tokens=100)
    tokens.contexts_for(s, INFO, cache_dir=tmp_path)
    (units_file,) = tmp_path.glob("tokens-*/UNITS.json")
    units_file.write_text(json.dumps({"num_units": FILES - 1}))  # as if the dataset had gained a file since
    with pytest.raises(CrossjaxError, match=rf"the source now has {FILES} units .* made when it had {FILES - 1}"):
        tokens.contexts_for(section(corpus[0], num_tokens=2000), INFO, cache_dir=tmp_path)  # needs more tokens


def test_damaged_data_file_is_named_and_earlier_tokens_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in range(2):
        (data / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in random_docs(25, f)))
    second = int(np.random.default_rng(0).permutation(2)[1])  # the data file read second (seed 0)
    with open(data / f"part-{second}.jsonl", "a") as fh:
        fh.write('{"text": "4 5\n')  # torn last line
    cache = tmp_path / "cache"
    with pytest.raises(CrossjaxError, match=rf"reading dataset .* shard {second} of 2 failed at row \d+ .*tokens "
                                            r"written so far are kept.*repair or download it again"):
        tokens.contexts_for(section(data, num_tokens=10**6, seed=0), INFO, cache_dir=cache)
    assert list(cache.glob("tokens-*/unit-000000/END-25"))  # the first file's tokens are kept


@pytest.mark.slow  # two interpreters importing datasets: ~15 s on two cores; the sequential test covers the rule
def test_two_processes_at_once_make_the_contexts_of_one(corpus, tmp_path):
    """Two OS processes share one cache at the same time (each waits for the other's units)."""
    import os
    import subprocess
    import sys

    want = tokens.contexts_for(section(corpus[0], num_tokens=700), INFO)
    script = os.path.join(os.path.dirname(__file__), "_tokens_process.py")
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, script, str(corpus[0]), str(tmp_path / "cache"), str(i), "2",
                               str(outs[i])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    got = [json.loads(o.read_text()) for o in outs]
    assert got[0]["fingerprint"] == got[1]["fingerprint"] == want.fingerprint()
    assert got[0]["units"] and got[1]["units"]
    assert all(u % 2 == i for i in range(2) for u in got[i]["units"])  # each read only its own data files
