"""crossjax GPTNeoX <-> Hugging Face GPT-NeoX snapshot files, and the checks a set of snapshots must pass.

Loading reads one tensor at a time (models/snapshot_files.py finds and reads the files), hashes its stored bytes,
converts it to the flax layout and places it straight onto its device sharding, so a model is never held twice in
host memory. `inspect_snapshot` gives the same description (config, content hash, tokenizer) without a model.
Saving writes config.json + model.safetensors that transformers' from_pretrained reads.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write, atomic_write_text
from crossjax.models.gpt_neox import GPTNeoX, NeoXConfig, abstract_model, hf_param_names
from crossjax.models.snapshot_files import (
    SAFE_SINGLE, TOKENIZER_FILES, TensorReader, canonical_names, hash_tensor, read_config, resolve_snapshot,
    tokenizer_path, weights_hash)

# A matrix smaller than this is replicated: splitting it saves little memory and costs communication.
_MIN_SHARD_ELEMENTS = 1 << 16


@dataclasses.dataclass
class LoadedSnapshot:
    """A loaded checkpoint. content_hash: sha256 over its tensors' stored bytes in canonical (sorted name) order."""

    config: NeoXConfig
    model: GPTNeoX | None  # None from inspect_snapshot
    content_hash: str
    path: Path
    tokenizer_path: Path | None = None
    name: str = ""


# ------------------------------------------------------------------------------------------------- sharding
def _split_dim(shape: tuple[int, ...], num_devices: int) -> int | None:
    """The dimension the default rule splits over num_devices: the largest one they divide, of a matrix of at least
    _MIN_SHARD_ELEMENTS elements; None: replicated."""
    if len(shape) < 2 or num_devices == 1 or int(np.prod(shape)) < _MIN_SHARD_ELEMENTS:
        return None
    return next((d for d in sorted(range(len(shape)), key=lambda d: -shape[d]) if shape[d] % num_devices == 0), None)


def _default_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Split the largest dimension of a big matrix over all mesh axes together; replicate the rest."""
    dim = _split_dim(shape, mesh.devices.size)
    if dim is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[dim] = tuple(mesh.axis_names)
    return PartitionSpec(*spec)


def placed_bytes(cfg: NeoXConfig, dtype, num_devices: int) -> int:
    """Bytes of GPTNeoX(cfg)'s weights in `dtype` on each of num_devices devices, placed as load_snapshot places
    them on a mesh of those devices by the default rule (the memory plan of an on-the-fly run counts them)."""
    total = 0
    for leaf in jax.tree.leaves(nnx.state(abstract_model(cfg, dtype=dtype, param_dtype=dtype))):
        nbytes = int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
        total += nbytes // num_devices if _split_dim(tuple(leaf.shape), num_devices) is not None else nbytes
    return total


def _spec_for(hf_name: str, shape, mesh: Mesh, rules) -> PartitionSpec:
    """rules: [(regex over the HF tensor name, PartitionSpec or None)], first match wins; the rest use the default.
    Specs refer to the flax layout (kernels are [in, out])."""
    for pattern, spec in rules or ():
        if re.search(pattern, hf_name):
            spec = PartitionSpec() if spec is None else spec
            if len(spec) > len(shape):
                raise CrossjaxError(f"sharding rule {pattern!r} gives {spec} with more axes than {hf_name} "
                                    f"{tuple(shape)}; fix the rule.")
            for dim, axes in enumerate(spec):
                if axes is None:
                    continue
                axes = (axes,) if isinstance(axes, str) else tuple(axes)
                size = int(np.prod([mesh.shape[a] for a in axes]))
                if shape[dim] % size:
                    raise CrossjaxError(f"sharding rule {pattern!r} splits dim {dim} of {hf_name} {tuple(shape)} "
                                        f"over {size} devices, which does not divide it; fix the rule.")
            return spec
    return _default_spec(tuple(shape), mesh)


def _place(arr: np.ndarray, hf_name: str, mesh: Mesh | None, rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(arr)
    sharding = NamedSharding(mesh, _spec_for(hf_name, arr.shape, mesh, rules))
    # Each device receives only its slice; in multi-process runs each process fills only its own devices.
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


# ------------------------------------------------------------------------------------------------- loading
def load_snapshot(spec: str | os.PathLike, revision: str | None = None, *, dtype=jnp.float32,
                  mesh: Mesh | None = None, sharding_rules: Sequence[tuple[str, PartitionSpec | None]] | None = None,
                  cache_dir: str | os.PathLike | None = None) -> LoadedSnapshot:
    """Loads a GPT-NeoX checkpoint into GPTNeoX with parameters (and matmul inputs) in `dtype`.

    With `mesh`, each parameter is created directly with a NamedSharding: `sharding_rules` [(regex over HF name,
    PartitionSpec over the flax layout)] first, else big matrices split on their largest dimension over all mesh
    axes. Parameters are placed with Auto axis types (on the same devices and names) even if `mesh` is Explicit.
    """
    path = resolve_snapshot(spec, revision, cache_dir=cache_dir)
    cfg = read_config(path)
    if mesh is not None and any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        # The model's ops carry no sharding annotations (XLA propagates them), which Explicit axes forbid:
        # place the weights on the same devices and axis names with Auto axis types.
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    np_dtype = jnp.dtype(dtype)
    model = abstract_model(cfg, dtype=dtype, param_dtype=dtype)
    graphdef, abs_state = nnx.split(model)
    flat = dict(nnx.to_flat_state(abs_state))

    reader = TensorReader(path)
    canon = canonical_names(reader.names(), cfg, path)
    targets = {hf: (fpath, transpose) for fpath, hf, transpose in hf_param_names(cfg)}
    h = hashlib.sha256()
    for hf_name in sorted(canon):
        stored = reader.get(canon[hf_name])
        hash_tensor(h, hf_name, stored)
        fpath, transpose = targets[hf_name]
        want = flat[fpath].get_value().shape
        arr = stored.T if transpose else stored
        if tuple(arr.shape) != tuple(want):
            raise CrossjaxError(f"{hf_name} in {path} has shape {tuple(stored.shape)}, but config.json implies "
                                f"{tuple(want[::-1]) if transpose else tuple(want)}; the weights and config disagree.")
        arr = np.ascontiguousarray(arr, dtype=np_dtype)
        flat[fpath] = flat[fpath].replace(_place(arr, hf_name, mesh, sharding_rules))
        del stored, arr
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    name = str(spec) if revision is None else f"{spec}@{revision}"
    return LoadedSnapshot(config=cfg, model=model, content_hash=h.hexdigest(), path=path,
                          tokenizer_path=tokenizer_path(path), name=name)


def inspect_snapshot(spec: str | os.PathLike, revision: str | None = None, *,
                     cache_dir: str | os.PathLike | None = None) -> LoadedSnapshot:
    """What load_snapshot says about a snapshot (config, content hash, tokenizer, name) with model=None: the
    weights are only streamed through the hash, so checking many snapshots costs no model in memory."""
    path = resolve_snapshot(spec, revision, cache_dir=cache_dir)
    name = str(spec) if revision is None else f"{spec}@{revision}"
    return LoadedSnapshot(config=read_config(path), model=None, content_hash=weights_hash(path), path=path,
                          tokenizer_path=tokenizer_path(path), name=name)


# ------------------------------------------------------------------------------------------------- saving
def _flat_params(model_or_params) -> dict[tuple, Any]:
    if isinstance(model_or_params, nnx.Module):
        state = nnx.state(model_or_params, nnx.Param)
    elif isinstance(model_or_params, nnx.State):
        state = model_or_params
    elif isinstance(model_or_params, Mapping):
        state = nnx.State(nnx.restore_int_paths(dict(model_or_params)))
    else:
        raise CrossjaxError(f"save_hf_snapshot takes a GPTNeoX, an nnx.State or a nested dict of its parameters, "
                            f"not {type(model_or_params).__name__}.")
    out = {}
    for p, v in nnx.to_flat_state(state):
        out[tuple(p)] = v.get_value() if isinstance(v, nnx.Variable) else v
    return out


def save_hf_snapshot(model_or_params, cfg: NeoXConfig, out_dir: str | os.PathLike, *,
                     tokenizer_dir: str | os.PathLike | None = None, dtype=None) -> Path:
    """Writes config.json + model.safetensors (HF GPT-NeoX names) that transformers' from_pretrained reads.

    Everything is checked before anything is written; files are written under temporary names and renamed.
    `dtype` (e.g. jnp.float16) casts on save; default keeps the parameters' dtype. Returns out_dir.
    """
    from safetensors.numpy import save_file

    params = _flat_params(model_or_params)
    tensors: dict[str, np.ndarray] = {}
    for fpath, hf_name, transpose in hf_param_names(cfg):
        if fpath not in params:
            raise CrossjaxError(f"parameter {'.'.join(map(str, fpath))} (for {hf_name}) is missing; the parameters "
                                "do not belong to a GPTNeoX built from this config.")
        arr = np.asarray(jax.device_get(params[fpath]))
        arr = arr.T if transpose else arr
        if dtype is not None:
            arr = arr.astype(jnp.dtype(dtype))
        tensors[hf_name] = np.ascontiguousarray(arr)
    expected = abstract_model(cfg)
    exp_flat = {tuple(p): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(expected, nnx.Param))}
    for fpath, hf_name, transpose in hf_param_names(cfg):
        shape = exp_flat[fpath][::-1] if transpose else exp_flat[fpath]
        if tensors[hf_name].shape != tuple(shape):
            raise CrossjaxError(f"{hf_name} has shape {tensors[hf_name].shape} but the config implies {tuple(shape)};"
                                " pass the config the model was built with.")
    extra = sorted(set(params) - set(exp_flat))
    if extra:
        raise CrossjaxError(f"parameters {['.'.join(map(str, p)) for p in extra[:5]]} are not part of GPT-NeoX "
                            "for this config; pass the matching config.")
    tok_files = []
    if tokenizer_dir is not None:
        tok_files = [Path(tokenizer_dir) / f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
        if not tok_files:
            raise CrossjaxError(f"tokenizer_dir {str(tokenizer_dir)!r} holds none of {TOKENIZER_FILES}; pass the "
                                "directory where the tokenizer was saved.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stored_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
        next(iter(tensors.values())).dtype, "bfloat16")
    config = {**cfg.to_hf_dict(), "dtype": stored_dtype}

    atomic_write(out / SAFE_SINGLE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    for f in tok_files:
        atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    # config.json last: a directory with a config is a complete snapshot.
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------- checks
def _tokenizer_fingerprint(tok: Path | None) -> str | None:
    if tok is None:
        return None
    h = hashlib.sha256()
    files = ["tokenizer.json"] if (tok / "tokenizer.json").is_file() else ["vocab.json", "merges.txt"]
    for f in files:
        if (tok / f).is_file():
            h.update(f.encode() + b"|" + (tok / f).read_bytes())
    return h.hexdigest()


def _named(loaded) -> list[tuple[str, LoadedSnapshot]]:
    if isinstance(loaded, Mapping):
        return [(str(k), v) for k, v in loaded.items()]
    return [(s.name or str(s.path), s) for s in loaded]


def check_snapshots_consistent(loaded: Sequence[LoadedSnapshot] | Mapping[str, LoadedSnapshot], *,
                               allow_duplicates: bool = False) -> list[list[str]]:
    """Checks that snapshots share architecture and tokenizer and that no two carry identical weights.

    Identical content hashes under two names raise CrossjaxError naming both (some Pythia revision branches
    serve another step's weights) unless allow_duplicates; returns the groups of names with identical weights.
    """
    items = _named(loaded)
    if not items:
        raise CrossjaxError("no snapshots given; list at least one in model.snapshots.")
    ref_name, ref = items[0]
    ref_arch = ref.config.architecture()
    for name, s in items[1:]:
        arch = s.config.architecture()
        diff = {k: (ref_arch[k], arch[k]) for k in ref_arch if ref_arch[k] != arch[k]}
        if diff:
            raise CrossjaxError(f"snapshots {ref_name!r} and {name!r} have different architectures "
                                f"({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())}); all snapshots "
                                "must come from one training run.")
    fps = [(name, _tokenizer_fingerprint(s.tokenizer_path)) for name, s in items]
    known = [(n, fp) for n, fp in fps if fp is not None]
    for name, fp in known[1:]:
        if fp != known[0][1]:
            raise CrossjaxError(f"snapshots {known[0][0]!r} and {name!r} ship different tokenizers; all snapshots "
                                "must share one tokenizer.")
    by_hash: dict[str, list[str]] = {}
    for name, s in items:
        by_hash.setdefault(s.content_hash, []).append(name)
    dups = [(h, names) for h, names in by_hash.items() if len(names) > 1]
    if dups and not allow_duplicates:
        digest, (a, b) = dups[0][0], dups[0][1][:2]
        raise CrossjaxError(f"snapshots {a!r} and {b!r} have identical weights (sha256 {digest[:12]}); "
                            "the source likely serves the wrong checkpoint for one of them (a known issue with some "
                            "Pythia revision branches). Drop one, or set model.allow_duplicate_weights=True.")
    return [names for _, names in dups]
