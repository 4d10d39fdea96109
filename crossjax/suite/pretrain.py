"""The offline tiny pre-training run: a small GPT-NeoX trained from scratch, saved on a Pythia-like snapshot schedule.

`ensure_suite(config)` builds what is missing and returns the suite directory:

    suite_dir/
      BUILD.json                 fingerprint + settings, written first (a different config here is refused)
      tokenizer/                 tokenizer.json, tokenizer_config.json, special_tokens_map.json
      data/train.npy, heldout.npy   the tokenised splits (uint16; documents joined by <|endoftext|>)
      step0/, step1/, step2/, step4/, ...   Hugging Face GPT-NeoX snapshots (config.json, model.safetensors,
                                 tokenizer files): crossjax loads them as it loads Pythia revisions, and so does
                                 transformers' GPTNeoXForCausalLM.from_pretrained
      losses.json                per snapshot: training and held-out loss on fixed token samples
      state/                     params + optimizer state + step at the latest snapshot (removed when done)
      DONE.json                  written last; a suite with DONE.json and the same fingerprint is reused as is

Determinism: the initial weights come from `seed`; the batch of step s is a function of (seed, s) only (an epoch's
permutation of fixed-length chunks of the token stream), so a build killed at any point and resumed from the last
checkpoint ends with the same weights as an uninterrupted one, and two builds with the same config are identical.

Training follows Pythia's recipe at a small scale: AdamW (0.9, 0.95, weight decay on matrices only), linear warm-up
then cosine decay to `min_lr_frac * lr`, gradient clipping at 1.0; documents are packed into contexts with
<|endoftext|> between them. Snapshot schedule: 0, 1, 2, 4, ... doubling up to `log_until`, then `linear_snapshots`
evenly spaced steps ending at `steps` (or an explicit `snapshots` list).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text
from crossjax.suite import corpus
from crossjax.suite import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
# Keys that do not change what is built (where it goes, whether it shows progress).
_NOT_FINGERPRINTED = ("enabled", "dir", "progress")


# ------------------------------------------------------------------------------------------------------ config
def default_config(preset: str = "default") -> ml_collections.ConfigDict:
    """The `suite` config section. preset "default": the tiny experiment's model (about 990 s of CPU time to
    build, so roughly 8-12 minutes on 2 idle CPU cores); "micro": a model that builds in seconds, for tests."""
    base = dict(
        enabled=False,        # build (or reuse) the suite before generating activations
        dir="",               # "" -> $CROSSJAX_CACHE or ~/.cache/crossjax, then suite-<fingerprint>
        vocab_size=4096,
        d_model=128,
        layers=4,
        heads=4,
        intermediate=0,       # 0 -> 4 * d_model
        rotary_pct=0.25,      # as Pythia
        context_len=128,
        batch=16,             # contexts per step
        steps=1600,
        lr=2e-3,
        warmup_steps=100,
        min_lr_frac=0.1,      # cosine decay ends at lr * min_lr_frac
        weight_decay=0.01,
        snapshots=[],         # explicit snapshot steps; [] -> derived from log_until and linear_snapshots
        log_until=128,        # 0, 1, 2, 4, ..., log_until (powers of two up to steps)
        linear_snapshots=8,   # then steps * k / linear_snapshots (k = 1..) past log_until, ending at `steps`
        max_documents=0,      # > 0: train on an evenly spread subset of this many training documents
        eval_contexts=64,     # fixed contexts of each split for the per-snapshot losses
        seed=0,
        progress=True,
    )
    if preset == "micro":
        base.update(vocab_size=384, d_model=32, layers=2, heads=2, context_len=32, batch=8, steps=48, lr=3e-3,
                    warmup_steps=4, log_until=8, linear_snapshots=4, max_documents=120, eval_contexts=16)
    elif preset != "default":
        raise CrossjaxError(f"Unknown suite preset {preset!r}: use 'default' or 'micro'.")
    return ml_collections.ConfigDict(base)


def _section(config) -> ml_collections.ConfigDict:
    """Accepts the whole config (with a `suite` section) or the section itself."""
    if "suite" in config and isinstance(config["suite"], (ml_collections.ConfigDict, dict)):
        return config["suite"]
    return config


def _settings(section) -> dict[str, Any]:
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    unknown = sorted(set(d) - set(default_config().keys()))
    if unknown:
        raise CrossjaxError(f"Unknown suite keys {unknown}; valid keys: {sorted(default_config().keys())}.")
    out = default_config().to_dict()
    out.update(d)
    out["snapshots"] = [int(s) for s in out["snapshots"]]
    return out


def validate(section) -> dict[str, Any]:
    """Checks the section; returns its settings as a plain dict (with defaults filled in)."""
    s = _settings(section)
    problems = []
    for key in ("vocab_size", "d_model", "layers", "heads", "context_len", "batch", "steps", "eval_contexts"):
        if not isinstance(s[key], int) or s[key] < 1:
            problems.append(f"suite.{key}={s[key]!r} must be a positive integer")
    if not problems:
        if not tokenizer_lib.MIN_VOCAB <= s["vocab_size"] <= 65535:
            problems.append(f"suite.vocab_size={s['vocab_size']} must lie in [{tokenizer_lib.MIN_VOCAB}, 65535]")
        if s["d_model"] % s["heads"]:
            problems.append(f"suite.d_model={s['d_model']} is not divisible by suite.heads={s['heads']}")
        elif int(s["d_model"] // s["heads"] * s["rotary_pct"]) % 2:
            problems.append(f"head_dim {s['d_model'] // s['heads']} * suite.rotary_pct={s['rotary_pct']} must give "
                            "an even number of rotary dims")
        if s["context_len"] < 2:
            problems.append("suite.context_len must be >= 2 (next-token loss needs two tokens)")
        if s["snapshots"]:
            snaps = s["snapshots"]
            if sorted(set(snaps)) != snaps or snaps[0] < 0 or snaps[-1] > s["steps"]:
                problems.append(f"suite.snapshots={snaps} must be increasing, unique and within [0, suite.steps="
                                f"{s['steps']}]")
    if not s["lr"] > 0 or not 0 <= s["min_lr_frac"] <= 1 or s["warmup_steps"] < 0 or s["weight_decay"] < 0:
        problems.append("suite.lr must be > 0, suite.min_lr_frac in [0, 1], suite.warmup_steps and "
                        "suite.weight_decay >= 0")
    if s["log_until"] < 0 or s["linear_snapshots"] < 0 or s["max_documents"] < 0:
        problems.append("suite.log_until, suite.linear_snapshots and suite.max_documents must be >= 0")
    if problems:
        raise CrossjaxError("invalid suite config:\n  - " + "\n  - ".join(problems))
    return s


def snapshot_steps(section) -> list[int]:
    """The steps at which snapshots are saved, e.g. [0, 1, 2, 4, ..., 256, 500, 750, ..., 2000]."""
    s = validate(section)
    if s["snapshots"]:
        return list(s["snapshots"])
    steps = s["steps"]
    out = [0]
    p = 1
    while p <= min(s["log_until"], steps):
        out.append(p)
        p *= 2
    n = s["linear_snapshots"]
    # Evenly spaced points past the doubling phase (Pythia: ..., 256, 512, then every 1000 steps).
    out.extend(p for p in (int(round(steps * k / n)) for k in range(1, n + 1)) if p > s["log_until"])
    if steps not in out:
        out.append(steps)  # the final weights are always a snapshot
    return sorted(set(out))


def snapshot_names(section) -> list[str]:
    """["step0", "step1", "step2", ...] in schedule order (the directory names under the suite dir)."""
    return [f"step{n}" for n in snapshot_steps(section)]


def fingerprint(section) -> str:
    """sha256 over everything that determines the built files (settings, corpus packages, format)."""
    s = validate(section)
    payload = {k: v for k, v in s.items() if k not in _NOT_FINGERPRINTED}
    payload["corpus"] = corpus.corpus_fingerprint()
    payload["format"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("CROSSJAX_CACHE") or Path.home() / ".cache" / "crossjax")


def suite_dir(section) -> Path:
    """Where the suite of this section lives: `dir` if set, else a cache dir named by the fingerprint."""
    section = _section(section)
    validate(section)
    if section.get("dir"):
        return Path(section["dir"]).expanduser()
    return cache_root() / f"suite-{fingerprint(section)[:12]}"


def neox_config(s: dict[str, Any]):
    from crossjax.models import NeoXConfig

    return NeoXConfig(
        vocab_size=s["vocab_size"], hidden_size=s["d_model"], num_layers=s["layers"], num_heads=s["heads"],
        intermediate_size=s["intermediate"] or 4 * s["d_model"], rotary_pct=float(s["rotary_pct"]),
        max_position_embeddings=s["context_len"], use_parallel_residual=True,
        bos_token_id=tokenizer_lib.EOS_ID, eos_token_id=tokenizer_lib.EOS_ID)


# -------------------------------------------------------------------------------------------------- files
def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished directory into place (a rename: readers never see a half-written one)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _fresh_tmp_dir(path: Path) -> Path:
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise CrossjaxError(f"{path} is corrupt ({e}); delete the suite directory {path.parent} and build again.")


def _check_dir_owner(root: Path, fp: str, settings: dict) -> dict | None:
    """Returns DONE.json if the suite is complete; raises if root holds a suite of another config."""
    for name in ("DONE.json", "BUILD.json"):
        rec = _read_json(root / name)
        if rec is None:
            continue
        if rec.get("fingerprint") != fp:
            old = rec.get("settings", {})
            diff = sorted(k for k in set(old) | set(settings)
                          if k not in _NOT_FINGERPRINTED and old.get(k) != settings.get(k))
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff) or \
                "corpus packages or file format changed"
            raise CrossjaxError(
                f"{root} holds a suite built with another config ({detail}). Use another suite.dir (or leave it "
                f"empty for a per-config cache dir), or delete {root} to rebuild it.")
        return rec if name == "DONE.json" else None
    if root.exists() and any(p for p in root.iterdir() if p.name != ".lock"):
        raise CrossjaxError(f"{root} exists and is not a crossjax suite (no BUILD.json); choose an empty or new "
                            "suite.dir.")
    return None


@contextlib.contextmanager
def _locked(root: Path):
    """One builder per suite dir at a time (other processes wait, then find it done)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------- data
def _train_documents(s: dict) -> list[str]:
    docs = corpus.load_documents("train")
    n = s["max_documents"]
    if n and n < len(docs):
        # An evenly spread subset keeps both sources (Shakespeare first, then the KJV) in the mix.
        idx = np.linspace(0, len(docs) - 1, n).round().astype(int)
        docs = [docs[i] for i in idx]
    return docs


def _token_stream(tok, docs: Sequence[str]) -> np.ndarray:
    """Documents -> one uint16 stream, each document followed by <|endoftext|> (as Pythia's packed data)."""
    parts = []
    for enc in tok.encode_batch(list(docs)):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.array([tokenizer_lib.EOS_ID], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros([0], np.uint16)


class ChunkSampler:
    """Batch of step s = chunks [B, T] of the stream, chunk order a fresh permutation per epoch from (seed, epoch)."""

    def __init__(self, stream: np.ndarray, context_len: int, batch: int, seed: int):
        self.T, self.B, self.seed = context_len, batch, seed
        self.num_chunks = len(stream) // context_len
        if self.num_chunks < 1:
            raise CrossjaxError(f"The training split has {len(stream)} tokens, fewer than one context of "
                                f"{context_len}; lower suite.context_len or raise suite.max_documents.")
        self.chunks = stream[: self.num_chunks * context_len].reshape(self.num_chunks, context_len)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
        return self._perms[epoch]

    def batch(self, step: int) -> np.ndarray:
        """int32 [B, T]: the batch trained on at `step` (0-based)."""
        rows = []
        for i in range(step * self.B, (step + 1) * self.B):
            epoch, j = divmod(i, self.num_chunks)
            rows.append(self.chunks[self._perm(epoch)[j]])
        return np.stack(rows).astype(np.int32)


def eval_sample(stream: np.ndarray, context_len: int, count: int) -> np.ndarray:
    """int32 [C, T]: `count` chunks spread evenly over the stream (fixed for every snapshot)."""
    n = len(stream) // context_len
    if n < 1:
        raise CrossjaxError(f"A split has {len(stream)} tokens, fewer than one context of {context_len}.")
    idx = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    return stream[: n * context_len].reshape(n, context_len)[idx].astype(np.int32)


def unigram_cross_entropy(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats) of the add-one unigram distribution of the training stream."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout].mean())


# ---------------------------------------------------------------------------------------------------- model
def init_params(s: dict):
    """(graphdef, params nnx.State) of a fresh model: normal(0.02) weights, output projections of each block
    scaled by 1/sqrt(2 * layers) (GPT-2 / Pythia-style small init on the residual branches)."""
    from crossjax.models import GPTNeoX

    model = GPTNeoX(neox_config(s), rngs=nnx.Rngs(params=s["seed"]))
    scale = 1.0 / math.sqrt(2 * s["layers"])
    for layer in model.layers:
        for lin in (layer.attention.dense, layer.mlp.dense_4h_to_h):
            lin.kernel[...] = lin.kernel[...] * scale
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def lr_schedule(s: dict):
    """Linear warm-up from lr / warmup_steps (never 0: step 1 must differ from step 0), then cosine decay to
    lr * min_lr_frac at `steps`."""
    lr, steps, floor = float(s["lr"]), int(s["steps"]), float(s["min_lr_frac"])
    warm = max(1, min(int(s["warmup_steps"]), steps))

    def sched(count):
        count = jnp.asarray(count, jnp.float32)
        ramp = lr * jnp.minimum(1.0, (count + 1.0) / warm)
        progress = jnp.clip((count + 1.0 - warm) / max(1, steps - warm), 0.0, 1.0)
        cosine = lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return jnp.where(count + 1.0 < warm, ramp, cosine)

    return sched


def make_optimizer(s: dict) -> optax.GradientTransformation:
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # no decay on biases and LayerNorms
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(lr_schedule(s), b1=0.9, b2=0.95, eps=1e-8, weight_decay=s["weight_decay"],
                                   mask=decay_mask))


class Trainer:
    """Jitted train step and evaluation over a (graphdef, params, opt_state) triple."""

    def __init__(self, s: dict):
        from crossjax.models import lm_loss

        self.graphdef, params = init_params(s)
        self.tx = make_optimizer(s)
        graphdef, tx = self.graphdef, self.tx

        def loss_fn(params, tokens):
            return lm_loss(nnx.merge(graphdef, params)(tokens), tokens)

        def step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.loss = jax.jit(loss_fn)
        self._init_params = params

    def fresh_state(self):
        """(params, opt_state) at step 0, as new buffers (the step donates its inputs)."""
        params = jax.tree.map(jnp.copy, self._init_params)
        return params, self.tx.init(params)

    def evaluate(self, params, tokens: np.ndarray, batch: int) -> float:
        """Mean next-token loss (nats) over contexts [C, T], weighting every batch by its size."""
        total, n = 0.0, 0
        for i in range(0, len(tokens), batch):
            chunk = tokens[i: i + batch]
            total += float(self.loss(params, jnp.asarray(chunk))) * len(chunk)
            n += len(chunk)
        return total / n


_TRAINER_KEYS = ("vocab_size", "d_model", "layers", "heads", "intermediate", "rotary_pct", "context_len", "steps",
                 "lr", "warmup_steps", "min_lr_frac", "weight_decay", "seed")
_trainers: dict[str, Trainer] = {}


def get_trainer(s: dict) -> Trainer:
    """A Trainer for these settings, reused within a process so a rebuild does not compile again."""
    key = json.dumps({k: s[k] for k in _TRAINER_KEYS}, sort_keys=True)
    if key not in _trainers:
        if len(_trainers) >= 4:
            _trainers.clear()
        _trainers[key] = Trainer(s)
    return _trainers[key]


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def _unflat(template, arrays: dict[str, np.ndarray], what: str):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    if sorted(keys) != sorted(arrays):
        raise CrossjaxError(f"The suite checkpoint's {what} do not match the model; delete the suite's state/ "
                            "directory to restart training from the last complete build.")
    out = []
    for k, (_, ref) in zip(keys, leaves):
        a = arrays[k]
        if a.shape != np.shape(ref) or a.dtype != np.asarray(ref).dtype:
            raise CrossjaxError(f"checkpoint {what} {k}: {a.shape} {a.dtype} differs from the model.")
        out.append(jnp.asarray(a))
    return jax.tree_util.tree_unflatten(treedef, out)


def save_state(path: Path, step: int, params, opt_state, fp: str) -> None:
    """params + optimizer state + step in one npz, written atomically."""
    arrays = {f"p{k}": v for k, v in _flat(params).items()}
    arrays.update({f"o{k}": v for k, v in _flat(opt_state).items()})
    arrays["__step__"] = np.array(step, np.int64)
    arrays["__fingerprint__"] = np.frombuffer(fp.encode(), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_state(path: Path, params_t, opt_t, fp: str):
    with np.load(path) as z:
        if bytes(z["__fingerprint__"]).decode() != fp:
            raise CrossjaxError(f"{path} belongs to another suite config; delete it to restart training.")
        step = int(z["__step__"])
        p = {k[1:]: z[k] for k in z.files if k.startswith("p")}
        o = {k[1:]: z[k] for k in z.files if k.startswith("o")}
    return step, _unflat(params_t, p, "parameters"), _unflat(opt_t, o, "optimizer state")


def params_to_model(graphdef, params):
    return nnx.merge(graphdef, params)


# ----------------------------------------------------------------------------------------------------- build
def _log(msg: str, show: bool) -> None:
    if show:
        print(f"[suite] {msg}", file=sys.stderr, flush=True)


def _prepare_data(root: Path, s: dict, show: bool):
    """Tokenizer and tokenised splits, built once (each file appears atomically)."""
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        _log(f"training a byte-level BPE tokenizer (vocab {s['vocab_size']})", show)
        tmp = _fresh_tmp_dir(tok_dir)
        tokenizer_lib.build_tokenizer(_train_documents(s), tmp, vocab_size=s["vocab_size"],
                                      model_max_length=s["context_len"])
        _replace_dir(tmp, tok_dir)
    tok = tokenizer_lib.load_tokenizer(tok_dir)
    data = root / "data"
    data.mkdir(exist_ok=True)
    streams = {}
    for split in ("train", "heldout"):
        path = data / f"{split}.npy"
        if not path.is_file():
            docs = _train_documents(s) if split == "train" else corpus.load_documents("heldout")
            _log(f"tokenising the {split} split ({len(docs)} documents)", show)
            _atomic_save_npy(path, _token_stream(tok, docs))
        streams[split] = np.load(path)
    return tok_dir, streams["train"], streams["heldout"]


def build_suite(cfg) -> list[Path]:
    """Builds (or finishes, or reuses) the suite of `cfg` (the `suite` section or a whole config).

    Returns the snapshot directories in schedule order. Raises CrossjaxError when the directory holds a suite of a
    different config.
    """
    section = _section(cfg)
    s = validate(section)
    root = suite_dir(section)
    fp = fingerprint(section)
    names = snapshot_names(section)
    show = bool(s["progress"])
    _check_dir_owner(root, fp, s)  # refuse a foreign or other-config dir before creating anything in it
    with _locked(root):
        done = _check_dir_owner(root, fp, s)
        if done is not None and all((root / n / "config.json").is_file() for n in names):
            return [root / n for n in names]
        if done is None:
            atomic_write_text(root / "BUILD.json", json.dumps(
                {"fingerprint": fp, "settings": s, "corpus": corpus.corpus_fingerprint(),
                 "format": FORMAT_VERSION}, indent=2, sort_keys=True))
        _train(root, s, fp, show)
    return [root / n for n in names]


def ensure_suite(config) -> Path:
    """Builds what is missing of the suite (progress on stderr) and returns its directory.

    `config` is the `suite` section or a whole config; with a whole config, `model.snapshots` and
    `model.path_template` are checked against the suite first (before any work), so activations find the snapshots.
    """
    section = _section(config)
    if section is not config:
        check_model_section(config)
    build_suite(section)
    return suite_dir(section)


def check_model_section(config) -> None:
    """The `model` section of a whole config must name suite snapshots under the suite's directory."""
    model = config["model"] if "model" in config else None
    if model is None:
        return
    section = _section(config)
    root, names = suite_dir(section), snapshot_names(section)
    unknown = [n for n in model.snapshots if n not in names]
    if unknown:
        raise CrossjaxError(f"model.snapshots has {unknown}, which the suite does not save; its snapshots are {names}.")
    expected = str(root / "{snapshot}")
    if model.path_template and Path(model.path_template).expanduser() != Path(expected):
        raise CrossjaxError(f"model.path_template={model.path_template!r} does not point into the suite at {root}; "
                            f"set --config.model.path_template={expected} (after changing suite settings, also set "
                            "suite.dir, or re-derive both with experiments/tiny.py).")


def _train(root: Path, s: dict, fp: str, show: bool) -> None:
    from crossjax.models import load as model_load

    t_start = time.time()
    tok_dir, train_stream, heldout_stream = _prepare_data(root, s, show)
    steps_sched = snapshot_steps(s)
    sampler = ChunkSampler(train_stream, s["context_len"], s["batch"], s["seed"])
    eval_train = eval_sample(train_stream, s["context_len"], s["eval_contexts"])
    eval_heldout = eval_sample(heldout_stream, s["context_len"], s["eval_contexts"])
    cfg = neox_config(s)

    trainer = get_trainer(s)
    params, opt_state = trainer.fresh_state()
    state_path = root / "state" / "latest.npz"
    losses_path = root / "losses.json"
    step = 0
    records: list[dict] = []
    if state_path.is_file():
        step, params, opt_state = load_state(state_path, params, opt_state, fp)
        prev = _read_json(losses_path) or {}
        records = [r for r in prev.get("snapshots", []) if r["step"] <= step]
        _log(f"resuming at step {step} of {s['steps']}", show)
    else:
        records = []

    baselines = {"uniform": math.log(s["vocab_size"]),
                 "unigram_heldout": unigram_cross_entropy(train_stream, heldout_stream, s["vocab_size"])}
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    _log(f"model: d_model {s['d_model']}, {s['layers']} layers, {n_params:,} parameters; "
         f"{len(train_stream):,} training tokens; {s['steps']} steps of {s['batch']}x{s['context_len']} tokens; "
         f"{len(steps_sched)} snapshots", show)

    def write_snapshot(at_step: int, running: list[float]):
        name = f"step{at_step}"
        tmp = _fresh_tmp_dir(root / name)
        model_load.save_hf_snapshot(params_to_model(trainer.graphdef, params), cfg, tmp, tokenizer_dir=tok_dir)
        _replace_dir(tmp, root / name)
        rec = {"name": name, "step": at_step, "tokens_seen": at_step * s["batch"] * s["context_len"],
               "train_loss": trainer.evaluate(params, eval_train, s["eval_contexts"]),
               "heldout_loss": trainer.evaluate(params, eval_heldout, s["eval_contexts"]),
               "train_loss_running": float(np.mean(running)) if running else None}
        records[:] = [r for r in records if r["step"] < at_step] + [rec]
        atomic_write_text(losses_path, json.dumps(
            {"snapshots": records, "baselines": baselines, "eval_tokens_per_split": int(eval_heldout.size),
             "fingerprint": fp}, indent=2))
        save_state(state_path, at_step, params, opt_state, fp)
        _log(f"snapshot {name}: train {rec['train_loss']:.3f}  held-out {rec['heldout_loss']:.3f}", show)

    if step == 0 and not any(r["step"] == 0 for r in records):
        write_snapshot(0, [])
    pending = [n for n in steps_sched if n > step]
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=s["steps"], initial=step, desc="suite pre-training", unit="step", file=sys.stderr)
    running: list[float] = []
    tokens_per_step = s["batch"] * s["context_len"]
    t0, steps_this_run = time.time(), 0
    while pending:
        batch = jnp.asarray(sampler.batch(step))
        params, opt_state, loss = trainer.step(params, opt_state, batch)
        step += 1
        steps_this_run += 1
        running.append(float(loss))
        if bar is not None:
            bar.update(1)
            tok_s = tokens_per_step * steps_this_run / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{running[-1]:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if step == pending[0]:
            pending.pop(0)
            write_snapshot(step, running)
            running = []
    if bar is not None:
        bar.close()
    atomic_write_text(root / "DONE.json", json.dumps(
        {"fingerprint": fp, "settings": s, "snapshots": snapshot_names(s), "build_seconds_last_run":
         round(time.time() - t_start, 1), "format": FORMAT_VERSION}, indent=2, sort_keys=True))
    shutil.rmtree(root / "state", ignore_errors=True)  # optimizer state is only needed to resume
    _log(f"suite ready at {root}", show)


def read_losses(root: str | os.PathLike) -> dict:
    """losses.json of a built suite."""
    rec = _read_json(Path(root) / "losses.json")
    if rec is None:
        raise CrossjaxError(f"No losses.json under {root}: build the suite first (ensure_suite).")
    return rec
