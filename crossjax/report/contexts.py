"""The top contexts of features at each snapshot, and their activation frequencies, for the report.

Everything the report takes from crossjax.analysis.lookup.FeatureIndex goes through `collect` (its public
methods only): the run's one index, DIR/index (crossjax.analysis.run_index), shared with complexity scoring:
loaded when it was built from the same weights with enough rows and examples, built otherwise (one streaming pass
over the first `rows` rows of the run's store; the store's rows are shuffled at write time, so that is a random
sample) and saved there.

Per snapshot: a row's activation for the index is h when the JumpReLU gate opens at some snapshot, and the gate
at snapshot s opens when h n[s, f] > theta_f. The feature's examples are sorted by h, so the rows that fire at
snapshot s are a prefix of them, and that prefix is the snapshot's own top-k (a row outside the index's top-k has
a smaller h, so it fires at s only if all the kept ones do). `Contexts.fires[s]` is the prefix's length. Other
activations (relu, topk) give one value per row: every snapshot shares the examples.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from crossjax import paths
from crossjax.analysis.run_index import index_path, run_index
from crossjax.errors import CrossjaxError

WINDOW = 8                      # tokens on each side of the firing one
_MARKS = ("\x02", "\x03")       # around the firing token in the index's decoded text; absent from real text
_SHOWN = str.maketrans({"\n": "\u23ce", "\r": "", "\t": "\u21e5"})   # a context stays on one line


@dataclasses.dataclass(frozen=True)
class Context:
    row: int                    # store row
    value: float                # the feature's activation h on that row
    before: str                 # text (or token ids) before the firing token, in its context
    token: str                  # the firing token
    after: str


@dataclasses.dataclass(frozen=True)
class Contexts:
    examples: list[Context]     # largest activation first
    fires: list[int]            # [S] how many leading examples fire at each snapshot (module docstring)


@dataclasses.dataclass(frozen=True)
class Collected:
    frequency: np.ndarray       # [F] fraction of scanned rows where each feature is active
    rows_scanned: int
    contexts: dict[int, Contexts]
    decoded: bool               # text decoded with the run's tokenizer (else token ids)
    index_dir: str              # where the index was saved


def collect(data, *, features: int, per_snapshot: int, rows: int, progress: bool = True) -> Collected:
    """Frequencies of every feature and the top `per_snapshot` contexts of `features` features (the most frequent
    ones and the separability sample) from the run's FeatureIndex (crossjax.analysis.run_index: workdir/index,
    reused when it fits, else built and saved there). `data` is an inputs.RunData. CrossjaxError when the index
    cannot be built (e.g. the store is gone)."""
    index = run_index(data.workdir, export_dir=data.export_dir, rows=rows, top_k=per_snapshot, window=WINDOW,
                      stage="report", progress=progress)
    index_dir = index_path(data.workdir)
    if index.num_features != data.num_features:
        raise CrossjaxError(f"the feature index in {index_dir} has {index.num_features} features, the export "
                            f"{data.num_features}: delete {index_dir} and write the report again")
    frequency = np.asarray(index.frequency, np.float64)
    tokenizer_file = find_tokenizer(data.workdir, data.snapshots)
    tokenizer = None if tokenizer_file is None else _open_tokenizer(tokenizer_file)   # read once, not per feature
    contexts = {}
    for f in chosen_features(frequency, data, features):
        examples = [_context(e, tokenizer is not None)
                    for e in index.top_examples(int(f), per_snapshot, tokenizer=tokenizer, marks=_MARKS)]
        contexts[int(f)] = Contexts(examples, _fires(data, int(f), [e.value for e in examples]))
    return Collected(frequency, index.rows_scanned, contexts, tokenizer is not None, index_dir)


def _open_tokenizer(path: str):
    from crossjax.tokens import open_tokenizer
    if paths.is_gcs(path):   # model snapshots on gs://: the file's text, not a local path
        from tokenizers import Tokenizer
        return Tokenizer.from_str(paths.read_text(path))
    return open_tokenizer(path)


def chosen_features(frequency: np.ndarray, data, features: int) -> list[int]:
    """The `features` most frequent features (ties: lower id) and every feature the separability evaluation
    sampled, ascending."""
    top = np.lexsort((np.arange(len(frequency)), -frequency))[:max(int(features), 0)]
    top = top[frequency[top] > 0]
    return sorted(set(top.tolist()) | set(data.separability_by_feature()))


def _fires(data, f: int, values: list[float]) -> list[int]:
    values = np.asarray(values, np.float32)
    if data.theta is None:
        return [len(values)] * len(data.snapshots)
    return [int(np.sum(values * data.norms[s, f] > data.theta[f])) for s in range(len(data.snapshots))]


def _context(example, decoded: bool) -> Context:
    if decoded and example.text is not None and example.text.count(_MARKS[0]) == 1 \
            and example.text.count(_MARKS[1]) == 1:
        before, rest = example.text.split(_MARKS[0])
        token, after = rest.split(_MARKS[1])
        return Context(example.row, example.value, *(t.translate(_SHOWN) for t in (before, token, after)))
    at = list(example.positions).index(example.position)
    ids = ["·" if t < 0 else f"#{t}" for t in example.tokens]     # ·: a position the store holds no row for
    before, after = ids[:at], ids[at + 1:]
    while before and before[0] == "·":                            # the ends of a context (or a one-row context)
        before.pop(0)
    while after and after[-1] == "·":
        after.pop()
    return Context(example.row, example.value, " ".join(before) + " " * bool(before), f"#{example.token_id}",
                   " " * bool(after) + " ".join(after))


def find_tokenizer(workdir: str, snapshots: list[str]) -> str | None:
    """A tokenizer.json of the run's model: in a local snapshot directory (model.path_template), or the Hub
    cache (model.repo; never the network). None when the run has none (planted data)."""
    from crossjax import workdir as workdir_lib
    try:
        model = (workdir_lib.read_recorded(workdir) or {}).get("model") or {}
    except CrossjaxError:
        return None
    template, repo = model.get("path_template") or "", model.get("repo") or ""
    for name in snapshots:
        if template:
            path = paths.join(template.replace("{snapshot}", name), "tokenizer.json")
            if paths.isfile(path):
                return path
        elif repo:
            try:
                from huggingface_hub import try_to_load_from_cache
                path = try_to_load_from_cache(repo, "tokenizer.json", cache_dir=model.get("cache_dir") or None,
                                              revision=name)
            except (OSError, ValueError):  # a cache we cannot read: token ids instead
                path = None
            if isinstance(path, str) and paths.isfile(path):
                return path
    return None
