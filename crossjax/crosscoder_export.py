"""A trained crosscoder as files: model.safetensors (float32 params) + config.json (its CrosscoderConfig and the
per-snapshot normalisation scales), written by the trainer at the end of a run and read by every analysis.

    export_params(params, scales, cfg, "runs/x/export")
    params, scales, cfg = load_exported("runs/x/export")      # also from gs://
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np

from crossjax import paths
from crossjax.crosscoder import PARAM_NAMES, Params, check_params, param_shapes
from crossjax.crosscoder_config import CrosscoderConfig
from crossjax.errors import CrossjaxError
from crossjax.files import atomic_write

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_FORMAT = "crossjax.crosscoder"


def export_params(params: Params, scales, cfg: CrosscoderConfig, out_dir: str) -> str:
    """Write out_dir/model.safetensors (float32 params) and out_dir/config.json (the CrosscoderConfig and the
    per-snapshot normalisation scales [S]). Params must be addressable from this process (gather sharded params
    first on several hosts). Each file is replaced atomically; out_dir may be on gs://. Returns out_dir."""
    from safetensors.numpy import save_file

    check_params(params, cfg)
    scales = np.asarray(jax.device_get(scales), np.float64).reshape(-1)
    if scales.shape != (cfg.num_snapshots,) or not np.all(np.isfinite(scales)) or not np.all(scales > 0):
        raise CrossjaxError(f"scales must be {cfg.num_snapshots} finite positive numbers (the store's per-snapshot "
                            f"scales); got {scales.tolist()}")
    tensors = {k: np.ascontiguousarray(np.asarray(jax.device_get(params[k]), np.float32)) for k in PARAM_NAMES}
    if not all(np.all(np.isfinite(v)) for v in tensors.values()):
        raise CrossjaxError("refusing to export non-finite crosscoder params; resume from an earlier checkpoint")
    out_dir = os.fspath(out_dir)
    paths.makedirs(out_dir)
    meta = {"format": EXPORT_FORMAT, "version": 1, "crosscoder": cfg.to_dict(), "scales": scales.tolist()}
    atomic_write(paths.join(out_dir, EXPORT_WEIGHTS),
                 lambda p: save_file(tensors, p, metadata={"format": EXPORT_FORMAT}))
    paths.write_text(paths.join(out_dir, EXPORT_CONFIG), json.dumps(meta, indent=2))
    return out_dir


def load_exported(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], np.ndarray, CrosscoderConfig]:
    """(params as float32 numpy arrays, scales [S] float32, cfg) from a directory written by export_params.
    Anything else (a malformed config.json, damaged or mismatched weights) is a CrossjaxError naming the file."""
    path = paths.check_supported(path, "the export directory")
    wpath, cpath = paths.join(path, EXPORT_WEIGHTS), paths.join(path, EXPORT_CONFIG)
    for p in (wpath, cpath):
        if not paths.isfile(p):
            raise CrossjaxError(f"{p} not found: {path} is not a crosscoder export (write one with export_params)")
    fix = ("export it again: rerun the training command with the same --config and --workdir (a finished run "
           "exports its last checkpoint again)")
    try:
        meta = json.loads(paths.read_bytes(cpath))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CrossjaxError(f"{cpath} is not valid JSON ({e}); {fix}") from None
    if not (isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT and meta.get("version") == 1
            and isinstance(meta.get("crosscoder"), dict)):
        raise CrossjaxError(f"{cpath} is not a version-1 {EXPORT_FORMAT} config (a JSON object with format, version, "
                            f"a crosscoder section and scales); {fix}")
    required = [f.name for f in dataclasses.fields(CrosscoderConfig) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in meta["crosscoder"]]
    if missing:
        raise CrossjaxError(f"{cpath}: the crosscoder section lacks {missing}; {fix}")
    try:
        cfg = CrosscoderConfig.from_dict(meta["crosscoder"])
    except CrossjaxError as e:
        raise CrossjaxError(f"{cpath}: {e}; {fix}") from None
    raw = meta.get("scales")
    if not (isinstance(raw, list) and len(raw) == cfg.num_snapshots
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    for v in raw)):
        raise CrossjaxError(f"{cpath} has scales {raw!r}; they must be {cfg.num_snapshots} finite numbers > 0, one "
                            f"per snapshot; {fix}")
    tensors = _read_weights(wpath, fix)
    shapes, got = param_shapes(cfg), {k: tuple(v.shape) for k, v in tensors.items()}
    if got != shapes:
        raise CrossjaxError(f"{wpath} holds tensors {got}, but {cpath} describes {shapes}; {fix}")
    params = {k: np.asarray(tensors[k], np.float32) for k in PARAM_NAMES}
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        raise CrossjaxError(f"{wpath} holds non-finite values in {bad}; {fix}")
    return params, np.asarray(raw, np.float32), cfg


def _read_weights(wpath: str, fix: str) -> dict[str, np.ndarray]:
    """The checked tensors of an export's weights file; one on gs:// is read through a temporary local file
    (removed at once), its errors naming the gs:// object."""
    from crossjax import safetensors_file

    if not paths.is_gcs(wpath):
        return safetensors_file.read_tensors(wpath, fix=fix)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="crossjax-export-") as tmp:
        local = os.path.join(tmp, EXPORT_WEIGHTS)
        with open(local, "wb") as fh:
            fh.write(paths.read_bytes(wpath))
        try:
            return safetensors_file.read_tensors(local, fix=fix)
        except CrossjaxError as e:
            raise CrossjaxError(str(e).replace(local, wpath)) from None
