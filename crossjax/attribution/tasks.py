"""Tasks as data: clean/corrupted prompt pairs with a right and a wrong next token, and their tokenized batch.

A task file is JSON lines, one pair per line (blank lines are skipped):

    {"clean": "When Mary and John went out, John gave it to",
     "corrupted": "When Mary and John went out, Tom gave it to", "right": " Mary", "wrong": " John"}
    {"clean_ids": [5, 9, 2, 5, 9], "corrupted_ids": [7, 3, 1, 7, 3], "right_id": 2, "wrong_id": 1}

Text fields are tokenized with the snapshots' tokenizer (BOS prepended to each prompt, as for the stored
contexts); the `_ids` fields give token ids directly (BOS too is the file's business then). An optional "meta"
object is carried along unread. The metric of a pair is logit(right) - logit(wrong) at the prompt's last token,
so each answer must be a single token and the clean and corrupted prompts must have the same number of tokens
(features are compared position by position): `tokenize` names the line that breaks either rule.

`load_task(spec, tokenizer)`: spec is a bundled name (`BUNDLED`, files under crossjax/attribution/tasks/ and the
generated "induction") or a path to a .jsonl file.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Iterable

import numpy as np

from crossjax import console
from crossjax.errors import CrossjaxError

TEXT_FIELDS = ("clean", "corrupted", "right", "wrong")
ID_FIELDS = ("clean_ids", "corrupted_ids", "right_id", "wrong_id")
OPTIONAL_FIELDS = ("meta",)
GENERATED = ("induction",)
FILE_TASKS = ("ioi", "sva", "kjv_agreement", "kjv_agreement_vocative")
BUNDLED = FILE_TASKS + GENERATED


@dataclasses.dataclass(frozen=True)
class Pair:
    """One line of a task: prompts as text or token ids, answers as text (one token) or ids."""
    clean: str | tuple[int, ...]
    corrupted: str | tuple[int, ...]
    right: str | int
    wrong: str | int
    where: str                       # "file:line", named by every error about this pair


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    pairs: tuple[Pair, ...]
    source: str                      # the file, or the generator and its settings


@dataclasses.dataclass(frozen=True)
class TokenizedTask:
    """P pairs, right-padded to T tokens. The metric of pair p is read at position last[p] of both prompts."""
    name: str
    clean: np.ndarray                # [P,T] int32 (padding: the tokenizer's pad id)
    corrupted: np.ndarray            # [P,T] int32
    mask: np.ndarray                 # [P,T] bool, real tokens (the same for both prompts)
    valid: np.ndarray                # [P,T] bool, positions the crosscoder reads (real, not BOS or special)
    last: np.ndarray                 # [P] int32, the last real position
    right: np.ndarray                # [P] int32
    wrong: np.ndarray                # [P] int32
    where: tuple[str, ...]           # [P] "file:line" of each pair
    skipped: tuple[str, ...] = ()    # lines left out (skip_invalid), with the reason

    @property
    def num_pairs(self) -> int:
        return int(self.clean.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _ids(value, field: str, where: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in value)):
        raise CrossjaxError(f"{where}: {field} must be a non-empty list of token ids (integers >= 0), got "
                            f"{value!r}; fix that line of the task file.")
    return tuple(value)


def parse_line(line: str, where: str) -> Pair | None:
    """One JSONL line -> Pair (None for a blank line); CrossjaxError naming `where` for anything malformed."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise CrossjaxError(f"{where}: not a JSON object ({e.msg} at column {e.colno}); each line of a task file "
                            f"is one object with {', '.join(TEXT_FIELDS)} (or {', '.join(ID_FIELDS)}).") from None
    if not isinstance(rec, dict):
        raise CrossjaxError(f"{where}: holds {type(rec).__name__}, not a JSON object with "
                            f"{', '.join(TEXT_FIELDS)}; fix that line of the task file.")
    keys = set(rec) - set(OPTIONAL_FIELDS)
    unknown = sorted(keys - set(TEXT_FIELDS) - set(ID_FIELDS))
    if unknown:
        raise CrossjaxError(f"{where}: unknown field(s) {unknown}; a pair has {', '.join(TEXT_FIELDS)} as text or "
                            f"{', '.join(ID_FIELDS)} as token ids (and an optional meta).")
    values = []
    for text_key, id_key in zip(TEXT_FIELDS, ID_FIELDS):
        if (text_key in rec) == (id_key in rec):
            raise CrossjaxError(f"{where}: give exactly one of {text_key!r} (text) and {id_key!r} (token ids).")
        if text_key in rec:
            v = rec[text_key]
            if not isinstance(v, str) or not v:
                raise CrossjaxError(f"{where}: {text_key} must be a non-empty string, got {v!r}.")
            values.append(v)
        elif id_key.endswith("_ids"):
            values.append(_ids(rec[id_key], id_key, where))
        else:
            values.append(_ids([rec[id_key]], id_key, where)[0])
    return Pair(*values, where=where)


def read_task(path: str | os.PathLike, name: str | None = None) -> Task:
    """A .jsonl task file -> Task; CrossjaxError naming the file (and line) when it is missing or malformed."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise CrossjaxError(f"task file {path} not found: give a .jsonl file or a bundled task "
                            f"({', '.join(BUNDLED)}).") from None
    except UnicodeDecodeError as e:
        raise CrossjaxError(f"task file {path} is not UTF-8 text ({e}); save it as UTF-8 JSON lines.") from None
    pairs = [p for i, line in enumerate(lines, 1) if (p := parse_line(line, f"{path}:{i}")) is not None]
    if not pairs:
        raise CrossjaxError(f"task file {path} holds no pair; write one JSON object per line.")
    return Task(name or os.path.splitext(os.path.basename(path))[0], tuple(pairs), path)


def bundled_path(name: str) -> str:
    return str(importlib.resources.files("crossjax.attribution") / "tasks" / f"{name}.jsonl")


def induction_task(tokenizer, *, pairs: int = 64, length: int = 12, seed: int = 0) -> Task:
    """Repeated random tokens: clean = BOS, r_1..r_L, r_1..r_j; corrupted = BOS, q_1..q_L, q_1..q_j with another
    random sequence q; right = r_{j+1}, wrong = q_{j+1} (what induction predicts in the corrupted prompt). Tokens
    are drawn from the non-special ids below the tokenizer's vocab size, distinct within a prompt pair, so any
    model's vocabulary works. `tokenizer`: tokens.TokenizerInfo."""
    if length < 2 or pairs < 1:
        raise CrossjaxError(f"induction needs length >= 2 and pairs >= 1, got length={length}, pairs={pairs}.")
    special = np.asarray(sorted(tokenizer.special_ids), np.int64)
    ids = np.setdiff1d(np.arange(tokenizer.vocab_size), special)
    if ids.size < 2 * length:
        raise CrossjaxError(f"the vocabulary has {ids.size} ordinary tokens; induction with length={length} needs "
                            f"{2 * length}.")
    rng = np.random.default_rng(seed)
    out = []
    for p in range(pairs):
        draw = rng.choice(ids, size=2 * length, replace=False).tolist()
        r, q = draw[:length], draw[length:]
        j = int(rng.integers(1, length))          # prompts end at r_j: 1..L-1 tokens of the repeat
        bos = [tokenizer.bos_id]
        out.append(Pair(tuple(bos + r + r[:j]), tuple(bos + q + q[:j]), r[j], q[j],
                        where=f"induction(seed={seed}) pair {p}"))
    return Task("induction", tuple(out), f"induction(pairs={pairs}, length={length}, seed={seed})")


def load_task(spec: str, tokenizer=None) -> Task:
    """A bundled task by name (BUNDLED) or a .jsonl path. `tokenizer` (tokens.TokenizerInfo) is needed by the
    generated tasks only."""
    if spec in GENERATED:
        if tokenizer is None:
            raise CrossjaxError(f"task {spec!r} is generated from the model's vocabulary: pass its tokenizer.")
        return induction_task(tokenizer)
    if spec in FILE_TASKS:
        return read_task(bundled_path(spec), spec)
    if os.path.exists(spec) or spec.endswith(".jsonl") or os.sep in spec:
        return read_task(spec)
    raise CrossjaxError(f"unknown task {spec!r}: give a bundled task ({', '.join(BUNDLED)}) or a .jsonl file.")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing


def _encoder(tokenizer):
    tok = tokenizer.tokenizer
    if hasattr(tok, "encode"):
        return lambda text: list(tok.encode(text, add_special_tokens=False).ids)
    if callable(tok):
        return lambda text: list(tok(text))
    raise CrossjaxError(f"tokenizer of type {type(tok).__name__} can neither encode nor be called.")


def _pair_ids(pair: Pair, encode, tokenizer) -> tuple[list[int], list[int], int, int]:
    """(clean ids, corrupted ids, right id, wrong id); CrossjaxError naming the line when a rule is broken."""
    def prompt(value):
        return list(value) if isinstance(value, tuple) else [tokenizer.bos_id] + encode(value)

    def answer(value, field):
        if isinstance(value, int):
            return value
        got = encode(value)
        if len(got) != 1:
            raise CrossjaxError(f"{pair.where}: the {field} answer {value!r} is {len(got)} tokens {got} with this "
                                "tokenizer; an answer must be one token (try another word, or a leading space), or "
                                "remove the line.")
        return got[0]

    clean, corrupted = prompt(pair.clean), prompt(pair.corrupted)
    right, wrong = answer(pair.right, "right"), answer(pair.wrong, "wrong")
    if len(clean) != len(corrupted):
        raise CrossjaxError(f"{pair.where}: the clean prompt is {len(clean)} tokens and the corrupted one "
                            f"{len(corrupted)}; they must be equally long (features are compared position by "
                            "position): change the corrupted words to ones of the same token length, or remove the "
                            "line.")
    if right == wrong:
        raise CrossjaxError(f"{pair.where}: the right and wrong answers are the same token {right}; give two "
                            "different answers.")
    top = max(clean + corrupted + [right, wrong])
    if top >= tokenizer.vocab_size:
        raise CrossjaxError(f"{pair.where}: token id {top} is outside the tokenizer's vocabulary "
                            f"({tokenizer.vocab_size}); give ids of the snapshots' tokenizer.")
    return clean, corrupted, right, wrong


def tokenize(task: Task, tokenizer, *, skip_invalid: bool = False, max_len: int | None = None) -> TokenizedTask:
    """Task + tokens.TokenizerInfo -> TokenizedTask. A pair whose answer is not one token, whose prompts differ in
    length or whose prompt is longer than max_len raises a CrossjaxError naming its line, or with skip_invalid is
    left out (listed in `skipped`, and said on stderr)."""
    encode = _encoder(tokenizer)
    rows, where, skipped = [], [], []
    for pair in task.pairs:
        try:
            ids = _pair_ids(pair, encode, tokenizer)
            if max_len is not None and len(ids[0]) > max_len:
                raise CrossjaxError(f"{pair.where}: the prompt is {len(ids[0])} tokens, more than the model's "
                                    f"{max_len} positions; shorten it or remove the line.")
        except CrossjaxError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        rows.append(ids)
        where.append(pair.where)
    if skipped:
        console.say("attribution", f"task {task.name}: left out {len(skipped)} of {len(task.pairs)} pairs, e.g. "
                    f"{skipped[0]}")
    if not rows:
        raise CrossjaxError(f"task {task.name}: no pair is usable with this tokenizer ({len(skipped)} left out, e.g. "
                            f"{skipped[0] if skipped else '-'}).")
    lengths = np.array([len(r[0]) for r in rows])
    p, t = len(rows), int(lengths.max())
    clean = np.full((p, t), tokenizer.pad_id, np.int32)
    corrupted = clean.copy()
    for i, (c, k, _, _) in enumerate(rows):
        clean[i, :len(c)], corrupted[i, :len(k)] = c, k
    mask = np.arange(t)[None, :] < lengths[:, None]
    special = np.asarray(sorted(tokenizer.special_ids), np.int64)
    valid = mask & ~np.isin(clean, special) & ~np.isin(corrupted, special)
    last = (lengths - 1).astype(np.int32)
    if not valid[np.arange(p), last].all():
        bad = where[int(np.argmin(valid[np.arange(p), last]))]
        raise CrossjaxError(f"{bad}: the prompt ends in a special token (BOS/EOS/padding), where the crosscoder "
                            "reads nothing; end the prompt with an ordinary token.")
    return TokenizedTask(task.name, clean, corrupted, mask, valid, last,
                         np.array([r[2] for r in rows], np.int32), np.array([r[3] for r in rows], np.int32),
                         tuple(where), tuple(skipped))


def write_task(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records (dicts of the task format) as a .jsonl task file; returns the number of lines."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def describe(task: TokenizedTask) -> str:
    lengths = task.last + 1
    return (f"task {task.name}: {task.num_pairs} pairs, prompts of {int(lengths.min())}-{int(lengths.max())} tokens"
            + (f", {len(task.skipped)} left out" if task.skipped else ""))

