"""crossjax.tokens and crossjax.documents: document sources, the tokenizer, and contexts with and without packing."""

import json
import sys

import numpy as np
import pytest

from crossjax import configs, documents, tokens
from crossjax.errors import CrossjaxError
import _activations_fixtures as fx

BOS, PAD, EOS, SPECIAL = 1, 0, 2, 3
EXCLUDED = {BOS, PAD, EOS, SPECIAL}


def int_tokenizer(text: str) -> list[int]:
    """Hand-made tokenizer: the text is its token ids."""
    return [int(w) for w in text.split()]


def build(docs, **kw):
    args = dict(context_len=5, num_tokens=8, packing=False, bos_id=BOS, pad_id=PAD, eos_id=EOS,
                special_ids=[SPECIAL], seed=0)
    args.update(kw)
    return tokens.build_contexts(docs, int_tokenizer, **args)


DOCS = ["10 11 12", "20 21 22 23 24 25", "30"]


def test_no_packing_hand_made():
    c = build(DOCS)
    # one context per document: BOS + the first T-1 tokens, padded
    expected = {0: ([1, 10, 11, 12, 0], [0, 1, 1, 1, 0]),
                1: ([1, 20, 21, 22, 23], [0, 1, 1, 1, 1]),
                2: ([1, 30, 0, 0, 0], [0, 1, 0, 0, 0])}
    assert sorted(c.doc_ids.tolist()) == [0, 1, 2]
    for row, doc in enumerate(c.doc_ids):
        ids, valid = expected[int(doc)]
        np.testing.assert_array_equal(c.input_ids[row], ids)
        np.testing.assert_array_equal(c.valid[row], np.array(valid, bool))
    assert c.input_ids.dtype == np.int32 and c.valid.dtype == bool
    assert c.num_valid == 8 and c.num_contexts == 3


def test_packing_hand_made():
    order = build(DOCS).doc_ids.tolist()  # both modes visit documents in the same seeded order
    c = build(DOCS, packing=True, num_tokens=10)
    stream = []
    for d in order:  # each document opened by BOS and closed by EOS (EOS differs from BOS here)
        stream += [BOS, *int_tokenizer(DOCS[d]), EOS]
    assert len(stream) == 16
    # the 10 document tokens all lie in the first 15 stream positions: the final EOS is never needed
    want = np.array(stream[:15]).reshape(3, 5)
    np.testing.assert_array_equal(c.input_ids, want)
    np.testing.assert_array_equal(c.valid, ~np.isin(want, list(EXCLUDED)))
    assert c.num_valid == 10  # every document token, none truncated (8 without packing)
    assert c.doc_ids[0] == order[0]


def test_packing_with_bos_equal_eos_uses_one_separator():
    c = tokens.build_contexts(["5 6", "7 8 9"], int_tokenizer, context_len=4, num_tokens=5, packing=True,
                              bos_id=0, pad_id=0, eos_id=0, seed=0)
    d = c.doc_ids[0]
    first, second = ("5 6", "7 8 9") if d == 0 else ("7 8 9", "5 6")
    want = [0, *int_tokenizer(first), 0, *int_tokenizer(second)]
    flat = c.input_ids.reshape(-1)[: len(want)]
    np.testing.assert_array_equal(flat, want)
    assert c.input_ids.shape == (2, 4) and c.num_valid == 5


def test_special_tokens_and_trimming():
    c = build(["10 3 11 12"], num_tokens=2)
    np.testing.assert_array_equal(c.input_ids[0], [1, 10, 3, 11, 12])
    # the special token is not a row; the third document token is dropped to stop at exactly num_tokens
    np.testing.assert_array_equal(c.valid[0], [0, 1, 0, 1, 0])


def test_stops_when_enough_tokens():
    docs = [" ".join(str(10 + i) for _ in range(3)) for i in range(50)]
    c = build(docs, num_tokens=7)
    assert c.num_valid == 7 and c.num_contexts == 3


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(CrossjaxError, match=r"only 8 usable tokens.*num_tokens=100"):
        build(DOCS, num_tokens=100)


def test_seeded_order():
    docs = [f"{10 + i} {11 + i}" for i in range(40)]
    a, b, c = build(docs, num_tokens=60, seed=0), build(docs, num_tokens=60, seed=0), build(docs, num_tokens=60, seed=1)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len(set(a.doc_ids.tolist())) == len(set(c.doc_ids.tolist())) == 30  # 30 distinct documents of 40
    assert a.doc_ids.tolist() != c.doc_ids.tolist()
    assert a.doc_ids.tolist() != sorted(a.doc_ids.tolist())  # shuffled


@pytest.mark.parametrize("kw, msg", [(dict(context_len=1), "context_len=1"), (dict(num_tokens=0), "num_tokens=0")])
def test_bad_sizes(kw, msg):
    with pytest.raises(CrossjaxError, match=msg):
        build(DOCS, **kw)


# ---- sources


def section(**kw):
    s = configs.tokens_config()
    s.update(kw)
    return s


def texts(tokens_section):
    """Every document of a source, in source order."""
    docs = documents.open_documents(tokens_section)
    return [docs[i] for i in range(len(docs))]


def test_jsonl_documents(tmp_path):
    docs = fx.sentences(5)
    fx.write_jsonl(tmp_path / "a.jsonl", docs[:3])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs[3:]) + "\n\n")
    assert texts(section(source="jsonl", path=str(tmp_path / "a.jsonl"))) == docs[:3]
    got = texts(section(source="jsonl", path=str(tmp_path / "b.jsonl"), text_field="body"))
    assert got == docs[3:]


def test_jsonl_missing_field_names_field_file_line_and_keys(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n{"content": "three", "id": 3}\n')
    with pytest.raises(CrossjaxError, match=r"c\.jsonl line 4 has no field 'text' \(keys seen: \['content', 'id'\]\)"):
        texts(section(source="jsonl", path=str(p)))


def test_jsonl_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n{"text": \n')
    with pytest.raises(CrossjaxError, match=r"d\.jsonl line 2 is not valid JSON"):
        texts(section(source="jsonl", path=str(p)))


def test_text_documents_files_and_separators(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first doc\nstill first\n<|endoftext|>\nsecond doc\n")
    (tmp_path / "sub" / "b.txt").write_text("third doc")
    (tmp_path / "skip.md").write_text("not text")
    want = ["first doc\nstill first", "second doc", "third doc"]
    assert texts(section(source="text", path=str(tmp_path))) == want
    assert texts(section(source="text", path=str(tmp_path / "**" / "b.txt"))) == ["third doc"]


@pytest.mark.parametrize("kw, msg", [
    (dict(source="nope"), "tokens.source='nope' is unknown"),
    (dict(source="jsonl", path=""), "tokens.path is empty"),
    (dict(source="text", path="/no/such/dir"), "does not exist"),
])
def test_source_errors(kw, msg):
    with pytest.raises(CrossjaxError, match=msg):
        documents.open_documents(section(**kw))


def test_hf_dataset_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(CrossjaxError, match="pip install datasets"):
        documents.open_documents(section(source="hf_dataset", path="x"))


def test_hf_dataset_from_disk(tmp_path):
    import datasets  # the test extra installs it: a missing one fails this test
    import pyarrow as pa

    docs = fx.sentences(4)
    ds = datasets.Dataset(pa.table({"text": docs, "n": list(range(4))}), fingerprint="test")
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert texts(section(source="hf_dataset", path=str(tmp_path / "ds"))) == docs
    assert texts(section(source="hf_dataset", path=str(tmp_path / "dd"))) == docs
    with pytest.raises(CrossjaxError, match=r"no field 'body' \(fields: \['text', 'n'\]\)"):
        documents.open_documents(section(source="hf_dataset", path=str(tmp_path / "ds"), text_field="body"))
    with pytest.raises(CrossjaxError, match=r"no split 'test' \(splits: \['train'\]\)"):
        documents.open_documents(section(source="hf_dataset", path=str(tmp_path / "dd"), split="test"))


def test_offline_source_reads_the_requested_split():
    held, train = texts(section(source="offline", split="heldout")), texts(section(source="offline", split="train"))
    assert held and train and not set(held) & set(train)  # the split reaches the corpus, it is not ignored
    with pytest.raises(CrossjaxError, match="heldout"):
        documents.open_documents(section(source="offline", split="test"))


# ---- tokenizer


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tok = fx.train_tokenizer(root / "tok")
    (root / "snap").mkdir()
    (root / "snap" / "tokenizer.json").write_bytes(tok.read_bytes())
    (root / "snap" / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    return root / "snap"


def test_load_tokenizer_ids(snapshot_dir):
    info = tokens.load_tokenizer(snapshot_dir)
    assert (info.bos_id, info.eos_id, info.pad_id) == (0, 0, 1)
    assert info.special_ids == {0, 1}
    assert info.vocab_size == 320 and len(info.sha256) == 64
    assert tokens.load_tokenizer(snapshot_dir / "tokenizer.json").describe() == info.describe()  # the file itself


def test_contexts_match_transformers_tokenizer(snapshot_dir):
    from transformers import PreTrainedTokenizerFast

    info = tokens.load_tokenizer(snapshot_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(snapshot_dir / "tokenizer.json"))
    docs = fx.sentences(12) + ["the cat <|endoftext|> sat"]
    with pytest.raises(CrossjaxError, match="usable tokens"):  # the corpus is smaller than asked
        tokens.build_contexts(docs, info.tokenizer, context_len=16, num_tokens=10**9, bos_id=0, pad_id=1)
    total = sum(min(len(ref.encode(d)), 15) for d in docs) - 1  # the in-text <|endoftext|> is no row
    c = tokens.build_contexts(docs, info.tokenizer, context_len=16, num_tokens=total,
                              bos_id=info.bos_id, pad_id=info.pad_id, eos_id=info.eos_id,
                              special_ids=info.special_ids)
    assert c.num_contexts == len(docs) and c.num_valid == total
    for row, d in enumerate(c.doc_ids):
        want = ref.encode(docs[d])[:15]
        np.testing.assert_array_equal(c.input_ids[row, 1:1 + len(want)], want)
        assert c.input_ids[row, 0] == 0 and np.all(c.input_ids[row, 1 + len(want):] == 1)
        assert not c.valid[row, 0] and not np.any(np.isin(c.input_ids[row][c.valid[row]], [0, 1]))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CrossjaxError, match="has no tokenizer.json"):
        tokens.load_tokenizer(tmp_path)
