"""Feature activations on new text: the run's tokenizer, every snapshot to the hook, then the crosscoder.

    acts = index.run("The cat sat on the mat.")       # FeatureIndex.run: a TextActivations
    acts.frame                                        # pandas: position, token_id, token, snapshot, feature, activation
    print(acts)                                       # the top features of each token at each snapshot

It computes what the activation stage would have stored for the text (crossjax/activations.py) and what the
crosscoder makes of it:

- Snapshots: the run's workdir/config.json names them (its model section; the offline suite's directory through
  pipeline.bind_suite). Each must still hold the weights the store was made from (their hashes are recorded in the
  index); one model is in memory at a time, on the default device.
- Tokens: the first snapshot's tokenizer, as for the store's contexts, no special tokens added (or token ids given
  directly). They are cut into pieces of context_len - 1, each opened by BOS and padded to context_len: each piece
  is a context as the store's are (one document per context, packing off), so a token sees at most context_len - 1
  tokens before it, as in training. Positions holding BOS, EOS, padding or special tokens are skipped (the store
  never holds them).
- Rows: each snapshot runs to the store's hook, ``contexts_per_batch`` contexts per call (one compiled shape), and
  the outputs are rounded to the store's dtype as the stored rows were; they are normalised with the export's
  scales, and the crosscoder's encoder and activation (crosscoder.forward's ``acts``) run ``batch_rows`` rows at a
  time. BatchTopK depends on the batch: there the text's rows are one batch.

So tokens taken from one of the store's contexts give that context's stored rows' activations. Memory: the hook
activations of the whole text (tokens x S x D in the store dtype) and one model.

Which feature fires where: JumpReLU gates each snapshot (f[b,s,i] = h[b,i] where h n[s,i] > theta_i), so a row of the
frame is one (token, snapshot, feature) with f > 0; activations shared by every snapshot (relu, topk, batchtopk) give
the same value at each snapshot and are listed at each.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crossjax import console, crosscoder
from crossjax.errors import CrossjaxError

_COLUMNS = ("position", "token_id", "token", "snapshot", "feature", "activation")


@dataclasses.dataclass(frozen=True)
class TextActivations:
    """The features of one text. frame: one row per (position, snapshot, feature) that fires, sorted by position,
    snapshot, then activation (largest first); position indexes token_ids (0 = the text's first token)."""

    token_ids: np.ndarray  # [T] int
    tokens: tuple[str, ...]  # [T] each token decoded on its own
    snapshots: tuple[str, ...]
    frame: Any  # pandas.DataFrame with the columns _COLUMNS

    def top(self, k: int = 3):
        """The `k` strongest features of each (position, snapshot): a slice of `frame`."""
        k = _positive("TextActivations.top", "k", k)
        return self.frame.groupby(["position", "snapshot"], observed=True, sort=False).head(k)

    def view(self, k: int = 3, snapshots: Sequence[str] | None = None) -> str:
        """A table, one line per token and one column per snapshot, of the `k` strongest features as
        'feature:activation' (empty where none fires)."""
        import pandas as pd

        names = list(self.snapshots if snapshots is None else snapshots)
        unknown = [n for n in names if n not in self.snapshots]
        if unknown:
            raise CrossjaxError(f"TextActivations.view: snapshots {unknown} are not among {list(self.snapshots)}.")
        top = self.top(k)
        top = top[top["snapshot"].isin(names)]
        cells = (top.assign(cell=[f"{f}:{a:.2f}" for f, a in zip(top["feature"], top["activation"])])
                 .groupby(["position", "snapshot"], observed=True)["cell"].agg(" ".join).unstack("snapshot"))
        cells = cells.reindex(index=range(len(self.token_ids)), columns=names).astype(object).fillna("")
        cells.index = pd.Index([f"{p} {t!r}" for p, t in enumerate(self.tokens)], name="token")
        return cells.to_string()

    def __str__(self) -> str:
        return self.view()


def _feature_ids(features, num_features: int) -> np.ndarray:
    try:
        ids = np.unique(np.asarray(features, np.int64).reshape(-1))
    except (TypeError, ValueError):
        ids = None
    if ids is None or len(ids) == 0 or ids.min() < 0 or ids.max() >= num_features:
        raise CrossjaxError(f"index.run: features={features!r} must be feature ids in 0..{num_features - 1}.")
    return ids


def _positive(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CrossjaxError(f"{where}: {name}={value!r} must be an integer >= 1.")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# The run's snapshots and tokenizer


def run_config(workdir):
    """The config the run in `workdir` was started with (workdir/config.json over this crossjax's defaults), its
    model section pointed at the offline suite when the run used it."""
    from crossjax import configs, pipeline
    from crossjax import workdir as workdir_lib

    if not workdir:
        raise CrossjaxError("this index does not know the run it was built from (it was built from an export "
                            "directory without the run's summary.json): pass workdir= the training workdir.")
    recorded = workdir_lib.read_recorded(str(workdir))
    if recorded is None:
        raise CrossjaxError(f"{workdir} has no config.json: new text runs through the snapshots the run's config "
                            "names, so pass workdir= the workdir the crosscoder was trained in.")
    config = configs.base_config()
    _overlay(config, recorded, "")
    if config.data.source != "snapshots":
        raise CrossjaxError(f"the run in {workdir} trained on data.source={config.data.source!r}, not on model "
                            "snapshots: there is no model to run new text through.")
    return pipeline.bind_suite(config)


def _overlay(config, recorded: dict, prefix: str) -> None:
    """Sets the keys of `recorded` that `config` has (keys this crossjax no longer knows are left out)."""
    for key, value in recorded.items():
        if key not in config:
            continue
        if isinstance(value, dict) and hasattr(config[key], "keys"):
            _overlay(config[key], value, f"{prefix}{key}.")
            continue
        try:
            config[key] = value
        except (TypeError, ValueError) as e:
            raise CrossjaxError(f"the run's config.json has {prefix}{key}={value!r}, which this crossjax's config "
                                f"does not take ({e}); use the crossjax version that trained the run.") from None


def _snapshot_sources(config, snapshots: Sequence[str]) -> list[tuple[str, str | None]]:
    """(spec, revision) of each of `snapshots`, and of the run's first snapshot (whose tokenizer made the
    contexts) at the end."""
    from crossjax import activations

    names, specs = activations.snapshot_specs(config.model)
    missing = [s for s in snapshots if s not in names]
    if missing:
        raise CrossjaxError(f"the index's snapshots {missing} are not in the run's model.snapshots {names}: "
                            "pass workdir= the workdir of the run this index was built from.")
    return [specs[names.index(s)] for s in snapshots] + [specs[0]]


def text_tokens(text, tokenizer) -> np.ndarray:
    """[T] int32 token ids of `text` (a string, encoded without special tokens, or token ids as they are)."""
    if isinstance(text, str):
        ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    elif isinstance(text, (Sequence, np.ndarray)) and not isinstance(text, (bytes, bytearray)):
        ids = np.asarray(text)
        if ids.ndim != 1 or not (len(ids) == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise CrossjaxError(f"index.run: got an array of shape {ids.shape} and dtype {ids.dtype}; pass a string "
                                "or a 1-D sequence of token ids.")
    else:
        raise CrossjaxError(f"index.run: text of type {type(text).__name__}; pass a string or a sequence of token "
                            "ids.")
    ids = np.asarray(ids, np.int64)
    if len(ids) == 0:
        raise CrossjaxError("index.run: the text has no tokens; pass some text.")
    if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
        raise CrossjaxError(f"index.run: token ids must lie in 0..{tokenizer.vocab_size - 1} (the run's tokenizer); "
                            f"got {int(ids.min())}..{int(ids.max())}.")
    return ids.astype(np.int32)


def text_contexts(ids: np.ndarray, context_len: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [C, T] int32, text_position [C, T]: the index into `ids` of each context position, -1 for BOS,
    padding and special tokens): the pieces of context_len - 1 tokens, each after BOS (module docstring)."""
    piece = context_len - 1
    n_ctx = math.ceil(len(ids) / piece)
    where = np.full(n_ctx * piece, -1, np.int64)
    where[:len(ids)] = np.arange(len(ids))
    body = np.where(where >= 0, ids[np.maximum(where, 0)], tokenizer.pad_id).reshape(n_ctx, piece)
    input_ids = np.concatenate([np.full((n_ctx, 1), tokenizer.bos_id), body], axis=1).astype(np.int32)
    position = np.concatenate([np.full((n_ctx, 1), -1), where.reshape(n_ctx, piece)], axis=1)
    excluded = {tokenizer.bos_id, tokenizer.pad_id, *tokenizer.special_ids}
    if tokenizer.eos_id is not None:
        excluded.add(tokenizer.eos_id)
    position[np.isin(input_ids, sorted(excluded))] = -1
    return input_ids, position


# ----------------------------------------------------------------------------------------------------------------
# Running it


def hook_rows(input_ids: np.ndarray, position: np.ndarray, sources, names, config, info, contexts_per_batch: int,
              progress: bool) -> np.ndarray:
    """[n, S, D] hook activations (store dtype) of the valid positions of input_ids [C, T], in text order, one
    snapshot at a time."""
    from crossjax import store as store_lib
    from crossjax.models import load as load_lib
    from crossjax.models.runner import Runner

    hook = info.get("hook") or config.model.hook
    out_dtype = jnp.dtype(store_lib.DTYPES[info.get("store_dtype") or config.store.dtype])
    hashes = info.get("snapshot_hashes")
    ctx, pos = np.nonzero(position >= 0)  # text order: contexts in order, positions in order
    batch = min(int(contexts_per_batch), len(input_ids))
    rows = None
    bar = console.progress("index.run", len(names), unit="snapshot", enabled=progress)
    for s, (spec, rev) in enumerate(sources):
        loaded = load_lib.load_snapshot(spec, rev, dtype=jnp.dtype(config.model.dtype),
                                        cache_dir=config.model.get("cache_dir") or None)
        if hashes and loaded.content_hash != hashes[s]:
            raise CrossjaxError(f"snapshot {names[s]} at {loaded.path} holds other weights (hash "
                                f"{loaded.content_hash[:12]}) than those the store was made from ({hashes[s][:12]}): "
                                "restore that snapshot, or make a new store and train on it.")
        runner = Runner(loaded.model)
        if rows is None:
            rows = np.empty((len(ctx), len(names), loaded.config.hidden_size), out_dtype)
        for k in range(0, len(input_ids), batch):
            ids = input_ids[k:k + batch]
            if len(ids) < batch:  # one compiled shape: fill with copies of the first context, discarded
                ids = np.concatenate([ids, np.repeat(input_ids[:1], batch - len(ids), axis=0)])
            acts = np.asarray(runner.hook(ids, hook, dtype=out_dtype))  # [batch, T, D]
            lo, hi = np.searchsorted(ctx, [k, k + batch])
            rows[lo:hi, s] = acts[ctx[lo:hi] - k, pos[lo:hi]]
        del runner, loaded
        bar.update(1)
    bar.close()
    return rows


@functools.partial(jax.jit, static_argnames=("cfg",))
def _snapshot_acts(params, x, scales, *, cfg):
    """x [B,S,D] (store dtype) -> crosscoder.forward's acts as [B,S,F] (JumpReLU) or [B,1,F] (shared)."""
    h = crosscoder.encode(params, crosscoder.normalize(x, scales))
    acts = crosscoder.activate(params, h, cfg)
    return acts if acts.ndim == 3 else acts[:, None, :]


def firing(rows: np.ndarray, export, num_snapshots: int, features: np.ndarray | None, batch_rows: int):
    """(row, snapshot, feature, activation) [m] of every activation > 0 of rows [n, S, D]."""
    params, scales, cfg = export
    n = len(rows)
    if n == 0:  # the text holds only special tokens
        return [np.zeros(0, np.int64)] * 3 + [np.zeros(0, np.float32)]
    size = n if cfg.activation == "batchtopk" else min(batch_rows, n)
    found = []
    for a in range(0, n, size):
        x = rows[a:a + size]
        if len(x) < size and cfg.activation != "batchtopk":  # row-wise activations: pad to the compiled shape
            x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
        acts = np.asarray(_snapshot_acts(params, x, scales, cfg=cfg))[:min(size, n - a)]
        if features is not None:
            acts = acts[:, :, features]
        r, s, f = np.nonzero(acts > 0)
        v = acts[r, s, f]
        if acts.shape[1] == 1:  # shared by every snapshot: listed at each
            r, f, v = (np.tile(t, num_snapshots) for t in (r, f, v))
            s = np.repeat(np.arange(num_snapshots), len(v) // num_snapshots)
        found.append((r + a, s, f if features is None else features[f], v))
    return [np.concatenate(c) for c in zip(*found)]


def run(text, *, export, snapshots: Sequence[str], info: dict, workdir=None, features=None,
        contexts_per_batch: int = 8, batch_rows: int = 1024, progress: bool = True) -> TextActivations:
    """FeatureIndex.run (module docstring). export: (params, scales, cfg) of the index's crosscoder; info: the
    index's settings (workdir, context_len, hook, store dtype, snapshot and tokenizer hashes)."""
    import pandas as pd

    from crossjax import tokens as tokens_lib
    from crossjax.models.snapshot_files import resolve_snapshot

    contexts_per_batch = _positive("index.run", "contexts_per_batch", contexts_per_batch)
    batch_rows = _positive("index.run", "batch_rows", batch_rows)
    if features is not None:
        features = _feature_ids(features, export[2].num_features)
    config = run_config(workdir or info.get("workdir"))
    sources = _snapshot_sources(config, snapshots)
    cache_dir = config.model.get("cache_dir") or None
    tokenizer = tokens_lib.load_tokenizer(resolve_snapshot(*sources[-1], cache_dir=cache_dir))
    if info.get("tokenizer_sha256") and tokenizer.sha256 != info["tokenizer_sha256"]:
        raise CrossjaxError(f"the tokenizer of snapshot {config.model.snapshots[0]} differs from the one the store's "
                            "contexts were made with: restore that snapshot's tokenizer.json.")
    ids = text_tokens(text, tokenizer)
    context_len = int(info.get("context_len") or config.tokens.context_len)
    input_ids, position = text_contexts(ids, context_len, tokenizer)
    rows = hook_rows(input_ids, position, sources[:-1], list(snapshots), config, info, contexts_per_batch, progress)
    r, s, f, v = firing(rows, export, len(snapshots), features, batch_rows)
    text_pos = position[position >= 0][r]
    order = np.lexsort((f, -v, s, text_pos))
    pieces = tuple(tokenizer.tokenizer.decode([int(t)], skip_special_tokens=False) for t in ids)
    frame = pd.DataFrame({
        "position": text_pos[order].astype(np.int64), "token_id": ids[text_pos[order]].astype(np.int64),
        "token": np.asarray(pieces, dtype=object)[text_pos[order]],
        "snapshot": pd.Categorical.from_codes(s[order], categories=list(snapshots), ordered=True),
        "feature": f[order].astype(np.int64), "activation": v[order].astype(np.float32),
    }, columns=list(_COLUMNS))
    return TextActivations(ids, pieces, tuple(snapshots), frame)
