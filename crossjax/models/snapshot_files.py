"""A Hugging Face GPT-NeoX snapshot's files: where they are, what they hold, and the hash of its weights.

No model is built here. `resolve_snapshot` finds a snapshot (local directory, `{snapshot}` template, Hub repo at a
revision); `TensorReader` gives its tensors one at a time (safetensors, sharded safetensors, or pytorch_model.bin
when torch is installed), every safetensors file's header checked first; `weights_hash` is the snapshot's content
hash, streamed from the files: sha256 over its tensors in canonical (sorted HF name) order, each as
`name|dtype|shape|` and its stored bytes, the same value `load.load_snapshot` computes while it loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from crossjax import safetensors_file
from crossjax.errors import CrossjaxError
from crossjax.models.gpt_neox import hf_param_names
from crossjax.models.neox_config import NeoXConfig

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")
DAMAGED_FIX = ("the snapshot's files are damaged: copy or download the snapshot again (from the Hub: "
               "huggingface-cli download REPO --revision REVISION --force-download)")
# Buffers older transformers versions saved beside the weights; they are recomputed, never loaded.
_IGNORED = re.compile(r"(\.attention\.(bias|masked_bias)$)|(rotary_emb\.inv_freq$)")
# transformers 5 names the unembedding lm_head in memory; checkpoints (and save_pretrained) use embed_out.
_ALIASES = {"lm_head.weight": "embed_out.weight"}


# ------------------------------------------------------------------------------------------------- resolving
def _weights_present(d: Path) -> bool:
    return any((d / f).is_file() for f in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))


def _check_local_dir(d: Path) -> Path:
    if not d.is_dir():
        raise CrossjaxError(f"snapshot path {str(d)!r} is not a directory; pass a directory holding config.json "
                            "and model.safetensors.")
    if not (d / "config.json").is_file():
        raise CrossjaxError(f"snapshot directory {str(d)!r} has no config.json; pass the directory that "
                            "save_pretrained / save_hf_snapshot wrote.")
    if not _weights_present(d):
        raise CrossjaxError(f"snapshot directory {str(d)!r} has no weights ({SAFE_SINGLE}, {SAFE_INDEX}, "
                            f"{BIN_SINGLE} or {BIN_INDEX}); the checkpoint is incomplete.")
    return d


def _looks_like_repo_id(spec: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", spec) is not None and not spec.startswith(".")


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None, cache_dir: str | None):
    """Hub download errors as CrossjaxErrors that name the fix."""
    from huggingface_hub import errors as hf_errors
    where = f"{repo}@{revision or 'main'}"
    try:
        yield
    except hf_errors.RevisionNotFoundError as e:
        raise CrossjaxError(f"revision {revision!r} does not exist in Hub repo {repo!r}; check the snapshot name "
                            "(Pythia revisions are step0, step1, ..., step143000).") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise CrossjaxError(f"Hub repo {repo!r} was not found (or needs a token); check the name, e.g. "
                            "EleutherAI/pythia-160m, or pass a local directory.") from e
    except (hf_errors.LocalEntryNotFoundError, OSError) as e:
        raise CrossjaxError(
            f"cannot get {where}: the Hugging Face Hub is unreachable (offline or no network) and the snapshot is "
            f"not in the cache{f' {cache_dir!r}' if cache_dir else ''} (and no local directory {repo!r} exists). "
            f"Pass a local directory with config.json and model.safetensors instead. ({type(e).__name__}: {e})"
        ) from e


def _hub_download(repo: str, revision: str | None, cache_dir: str | None) -> Path:
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors as hf_errors
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise CrossjaxError("huggingface_hub is not installed; install it or pass a local directory.") from e
    where = f"{repo}@{revision or 'main'}"
    safe_patterns = ["config.json", "*.safetensors", SAFE_INDEX, *TOKENIZER_FILES]
    bin_patterns = ["config.json", "pytorch_model*.bin", BIN_INDEX, *TOKENIZER_FILES]

    def fetch(patterns, local_only):
        return Path(hf.snapshot_download(repo, revision=revision, cache_dir=cache_dir or None,
                                         allow_patterns=patterns, local_files_only=local_only))

    with _hub_errors(repo, revision, cache_dir):
        try:  # the cache first: no network needed for snapshots downloaded before
            path = fetch(safe_patterns, True)
            if not _weights_present(path):
                path = fetch(bin_patterns, True)
        except hf_errors.LocalEntryNotFoundError:
            path = fetch(safe_patterns, False)
            if not _weights_present(path):
                path = fetch(bin_patterns, False)
    if not (path / "config.json").is_file() or not _weights_present(path):
        raise CrossjaxError(f"Hub snapshot {where} has no config.json or no weights; it is not a GPT-NeoX "
                            "checkpoint crossjax can load.")
    return path


def resolve_snapshot(spec: str | os.PathLike, revision: str | None = None, *,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """A snapshot spec -> local directory with config.json and weights.

    spec is a local directory (a `{snapshot}` placeholder in it is filled with `revision`) or a Hub repo name
    (`owner/name`, downloaded at `revision` into the Hugging Face cache, which is read first).
    """
    spec = os.fspath(spec)
    if "{snapshot}" in spec:
        if revision is None:
            raise CrossjaxError(f"path template {spec!r} needs a snapshot name: pass revision=<snapshot>.")
        spec = spec.replace("{snapshot}", str(revision))
        revision = None
        p = Path(spec).expanduser()
        if not p.exists():
            raise CrossjaxError(f"snapshot directory {spec!r} does not exist; check model.path_template and the "
                                "snapshot names.")
    p = Path(spec).expanduser()
    if p.exists():
        if revision is not None:
            raise CrossjaxError(f"{spec!r} is a local directory, which has no revisions (got revision "
                                f"{revision!r}); put {{snapshot}} in the path instead, or pass revision=None.")
        return _check_local_dir(p)
    if _looks_like_repo_id(spec):
        return _hub_download(spec, revision, os.fspath(cache_dir) if cache_dir else None)
    raise CrossjaxError(f"snapshot directory {spec!r} does not exist (and it is not a Hub repo name "
                        "'owner/name'); check the path.")


def read_architecture(spec: str | os.PathLike, revision: str | None = None, *,
                      cache_dir: str | os.PathLike | None = None) -> NeoXConfig:
    """The architecture of a snapshot spec (as resolve_snapshot takes it) from its config.json alone: a local
    directory needs no weights, and from the Hub only config.json is fetched (the cache first)."""
    spec = os.fspath(spec)
    if "{snapshot}" in spec:
        if revision is None:
            raise CrossjaxError(f"path template {spec!r} needs a snapshot name: pass revision=<snapshot>.")
        spec, revision = spec.replace("{snapshot}", str(revision)), None
    local = Path(spec).expanduser()
    if local.exists() or not _looks_like_repo_id(spec):
        if not (local / "config.json").is_file():
            raise CrossjaxError(f"no config.json in {spec!r}: it is not a Hugging Face snapshot directory; check "
                                "model.path_template and the snapshot names.")
        return read_config(local)
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors
    cache = os.fspath(cache_dir) if cache_dir else None

    def fetch(local_only):
        return Path(hf.hf_hub_download(spec, "config.json", revision=revision, cache_dir=cache,
                                       local_files_only=local_only))
    with _hub_errors(spec, revision, cache):
        try:
            file = fetch(True)
        except hf_errors.LocalEntryNotFoundError:
            file = fetch(False)
    return read_config(file.parent)


def read_config(path: Path) -> NeoXConfig:
    """The architecture in a snapshot directory's config.json."""
    file = path / "config.json"
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise safetensors_file.DamagedFileError(file, f"is not valid JSON ({e})", DAMAGED_FIX) from None
    if not isinstance(d, dict):
        raise safetensors_file.DamagedFileError(file, f"holds a JSON {type(d).__name__}, not a model config",
                                                DAMAGED_FIX)
    try:
        return NeoXConfig.from_hf_dict(d)
    except CrossjaxError:
        raise
    except (TypeError, ValueError) as e:  # a field of the wrong type, e.g. "vocab_size": "many"
        raise safetensors_file.DamagedFileError(file, f"is not a GPT-NeoX config ({e})", DAMAGED_FIX) from None


def tokenizer_path(path: Path) -> Path | None:
    """The snapshot directory when it ships a tokenizer, else None."""
    return path if any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")) else None


# ------------------------------------------------------------------------------------------------- reading
def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CrossjaxError(f"{index} is not a weight index (JSON with a weight_map); {DAMAGED_FIX}.") from None
    return weight_map


def _safetensors_files(path: Path) -> list[str]:
    """The safetensors files of a snapshot directory (shards named by its index, or the single file)."""
    if not (path / SAFE_INDEX).is_file():
        return [SAFE_SINGLE]
    files = sorted(set(_weight_map(path / SAFE_INDEX).values()))
    for f in files:
        if not (path / f).is_file():
            raise CrossjaxError(f"{path / SAFE_INDEX} names shard {f} but it is missing; the download is "
                                "incomplete: fetch the snapshot again.")
    return files


class TensorReader:
    """Tensor-by-tensor access to a checkpoint directory's weights (numpy arrays in their stored dtype)."""

    def __init__(self, path: Path):
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._torch_sd: dict[str, Any] | None = None
        if (path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file():
            from safetensors import SafetensorError, safe_open
            for f in _safetensors_files(path):
                names = safetensors_file.read_header(path / f, fix=DAMAGED_FIX)
                try:
                    self._files[f] = safe_open(str(path / f), framework="numpy")
                except SafetensorError as e:
                    raise safetensors_file.DamagedFileError(path / f, f"cannot be read ({e})", DAMAGED_FIX) from None
                self._where.update({k: f for k in names})
        else:
            self._load_torch(path)

    def _load_torch(self, path: Path):
        try:
            import torch
        except ImportError as e:
            raise CrossjaxError(f"{path} holds only pytorch_model.bin weights, which need torch to read; install "
                                "torch (CPU build is enough) or convert the checkpoint to safetensors.") from e
        files = ([BIN_SINGLE] if (path / BIN_SINGLE).is_file()
                 else sorted(set(_weight_map(path / BIN_INDEX).values())))
        self._torch_sd = {}
        for f in files:
            try:  # mmap keeps only the tensor being converted resident
                sd = torch.load(str(path / f), map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
                raise safetensors_file.DamagedFileError(path / f, f"cannot be read by torch ({e})",
                                                        DAMAGED_FIX) from None
            self._torch_sd.update(sd)
            self._where.update({k: f for k in sd})

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> np.ndarray:
        if self._torch_sd is not None:
            t = self._torch_sd[name]
            import torch
            if t.dtype == torch.bfloat16:
                import ml_dtypes
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.numpy()
        return self._files[self._where[name]].get_tensor(name)


def canonical_names(names, cfg: NeoXConfig, path: Path) -> dict[str, str]:
    """canonical HF name -> name in the file, after dropping recomputed buffers; checks the set of tensors."""
    canon: dict[str, str] = {}
    for n in names:
        c = _ALIASES.get(n, n)
        if _IGNORED.search(c):
            continue
        if cfg.tie_word_embeddings and c == "embed_out.weight":
            continue
        canon[c] = n
    expected = {hf for _, hf, _ in hf_param_names(cfg)}
    missing, extra = sorted(expected - canon.keys()), sorted(canon.keys() - expected)
    if missing or extra:
        raise CrossjaxError(f"weights in {path} do not match its config.json (GPT-NeoX with {cfg.num_layers} layers): "
                            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                            f"{extra[:5]}{'...' if len(extra) > 5 else ''}. The checkpoint is corrupt or not GPT-NeoX.")
    return canon


# ------------------------------------------------------------------------------------------------- hashing
def _prefix(name: str, dtype: str, shape) -> bytes:
    return f"{name}|{dtype}|{','.join(map(str, shape))}|".encode()


def hash_tensor(h, name: str, arr: np.ndarray) -> None:
    """Adds one tensor (canonical name, stored array) to a content hash."""
    h.update(_prefix(name, arr.dtype.name, arr.shape))
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)


def weights_hash(path: str | os.PathLike) -> str:
    """The content hash of a snapshot directory's weights without building a model: safetensors files are
    streamed (memory: one chunk), pytorch_model.bin is read one tensor at a time. Equal to
    `load_snapshot(path).content_hash`."""
    path = Path(path)
    cfg = read_config(path)
    h = hashlib.sha256()
    if not ((path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file()):
        reader = TensorReader(path)
        canon = canonical_names(reader.names(), cfg, path)
        for name in sorted(canon):
            hash_tensor(h, name, reader.get(canon[name]))
        return h.hexdigest()
    entries = {}  # name in the file -> (file, TensorEntry)
    for f in _safetensors_files(path):
        for name, entry in safetensors_file.read_header(path / f, fix=DAMAGED_FIX).items():
            entries[name] = (f, entry)
    canon = canonical_names(entries, cfg, path)
    handles: dict[str, Any] = {}
    try:
        for name in sorted(canon):
            f, entry = entries[canon[name]]
            fh = handles.get(f) or handles.setdefault(f, open(path / f, "rb"))
            h.update(_prefix(name, entry.dtype, entry.shape))
            for piece in safetensors_file.stream(fh, entry):
                h.update(piece)
    finally:
        for fh in handles.values():
            fh.close()
    return h.hexdigest()
