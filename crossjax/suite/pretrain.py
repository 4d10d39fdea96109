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
      state/                     orbax checkpoint of params + optimizer state at the latest snapshot (removed
                                 when done)
      DONE.json                  written last, with the sha256 of every snapshot's weights; a suite with DONE.json
                                 and the same fingerprint is reused after its snapshots are verified against them

Determinism: the initial weights come from `seed`; the batch of step s is a function of (seed, s) only (an epoch's
permutation of fixed-length chunks of the token stream), so a build killed at any point and resumed from the last
checkpoint ends with the same weights as an uninterrupted one, and two builds with the same config are identical.

Training follows Pythia's recipe at a small scale: AdamW (0.9, 0.95, weight decay on matrices only), linear warm-up
then cosine decay to `min_lr_frac * lr`, gradient clipping at 1.0; documents are packed into contexts with
<|endoftext|> between them. Snapshot schedule: 0, 1, 2, 4, ... doubling up to `log_until`, then `linear_snapshots`
evenly spaced steps ending at `steps` (or an explicit `snapshots` list).

This module holds the settings (validation, snapshot schedule, fingerprint, where the suite lives) and the build
around the training: the directory's owner and lock, BUILD.json and DONE.json. The pieces it builds with:
`token_data` (tokenizer, splits, batches), `model` (the network and its jitted step), `training` (the loop,
snapshots, losses.json, orbax checkpoints of the training state), `weight_hashes` (the snapshots' recorded
hashes, verified at every reuse).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import ml_collections

from crossjax import configs, console
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write_text
from crossjax.suite import corpus, dirs, training, weight_hashes
from crossjax.suite import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
# Keys that do not change what is built (where it goes, whether it shows progress).
_NOT_FINGERPRINTED = ("enabled", "dir", "progress")


# ------------------------------------------------------------------------------------------------------ config
def _section(config) -> ml_collections.ConfigDict:
    """Accepts the whole config (with a `suite` section) or the section itself."""
    if "suite" in config and isinstance(config["suite"], (ml_collections.ConfigDict, dict)):
        return config["suite"]
    return config


def _settings(section) -> dict[str, Any]:
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    defaults = configs.suite_config()
    unknown = sorted(set(d) - set(defaults.keys()))
    if unknown:
        raise CrossjaxError(f"Unknown suite keys {unknown}; valid keys: {sorted(defaults.keys())}.")
    out = defaults.to_dict()
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


# ------------------------------------------------------------------------------------------------- the build
def _check_dir_owner(root: Path, fp: str, settings: dict) -> dict | None:
    """Returns DONE.json if the suite is complete; raises if root holds a suite of another config."""
    for name in ("DONE.json", "BUILD.json"):
        rec = dirs.read_json(root / name)
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
            weight_hashes.verify(root, done, names, show=show)  # a damaged file is refused before it is used
            return [root / n for n in names]
        if done is None:
            atomic_write_text(root / "BUILD.json", json.dumps(
                {"fingerprint": fp, "settings": s, "corpus": corpus.corpus_fingerprint(),
                 "format": FORMAT_VERSION}, indent=2, sort_keys=True))
        t_start = time.time()
        training.train(root, s, fp, snapshot_steps(s), show)
        atomic_write_text(root / weight_hashes.DONE_FILE, json.dumps(
            {"fingerprint": fp, "settings": s, "snapshots": names, "build_seconds_last_run":
             round(time.time() - t_start, 1), "format": FORMAT_VERSION,
             training.WEIGHTS_KEY: weight_hashes.recorded_at_build(root, names)}, indent=2, sort_keys=True))
        training.remove_state(root)
        console.say("suite", f"suite ready at {root}", enabled=show)
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
                            f"set --config.model.path_template={expected} (or leave it empty: the pipeline "
                            "then points it at the suite).")


def read_losses(root: str | os.PathLike) -> dict:
    """losses.json of a built suite."""
    rec = dirs.read_json(Path(root) / "losses.json")
    if rec is None:
        raise CrossjaxError(f"No losses.json under {root}: build the suite first (ensure_suite).")
    return rec
