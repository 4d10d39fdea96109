"""The crosscoder's settings, defined once: the `CrosscoderConfig` dataclass and the `crosscoder` config section.

The dataclass fields' defaults are the section's defaults (`default_config` is built from them), so a default is
written in one place. No JAX here: the config files read the section before any backend starts. The math that
uses these settings is crossjax/crosscoder.py, which also exposes both names.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from ml_collections import ConfigDict

from crossjax.errors import CrossjaxError

ACTIVATIONS = ("jumprelu", "relu", "topk", "batchtopk")

# The section's keys without a dataclass default: F has none there (a config must be explicit about it), and
# init_norm belongs to the trainer, not to the crosscoder's description.
_NUM_FEATURES = 24576        # F (expansion 32 at d_model 768)
_INIT_NORM = -1.0            # initial decoder row norm; -1 = grid search on the first batch
_FROM_DATA = ("num_snapshots", "d_model")
_CASTS = {"int": int, "float": float, "str": str}


@dataclasses.dataclass(frozen=True)
class CrosscoderConfig:
    """Static description of one crosscoder; hashable, so it can be a static argument of jit.

    Defaults are the paper's Pythia-160M run (PAPER.md)."""
    num_snapshots: int                # S, from the data
    d_model: int                      # D, from the data
    num_features: int                 # F
    activation: str = "jumprelu"      # "jumprelu" | "relu" | "topk" | "batchtopk"
    k: int = 32                       # topk: active features per token; batchtopk: k * B per batch
    threshold_init: float = 0.1       # jumprelu theta at initialisation
    jump_bandwidth: float = 4.0       # eps, width of the rectangle kernel of the theta estimator (paper: 4.0)
    tanh_k: float = 4.0               # tanh-quad penalty sum_i p_i (1 + p_i / c), p_i = mean tanh(k f n): k
    tanh_c: float = 0.01              # and c
    aux_k: int = 512                  # AuxK: dead features used to reconstruct the residual (topk/batchtopk)
    aux_coef: float = 1.0 / 32.0      # AuxK loss weight

    def __post_init__(self):
        problems = []
        for name in ("num_snapshots", "d_model", "num_features", "k", "aux_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be an integer >= 1")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation={self.activation!r} must be one of {ACTIVATIONS}")
        for name in ("threshold_init", "jump_bandwidth", "tanh_k", "tanh_c"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                problems.append(f"{name}={value!r} must be a finite number > 0")
        if not (isinstance(self.aux_coef, (int, float)) and math.isfinite(self.aux_coef) and self.aux_coef >= 0):
            problems.append(f"aux_coef={self.aux_coef!r} must be a finite number >= 0")
        if (self.activation in ("topk", "batchtopk") and isinstance(self.k, (int, np.integer))
                and isinstance(self.num_features, (int, np.integer)) and self.k > self.num_features):
            problems.append(f"k={self.k} exceeds num_features={self.num_features}; lower crosscoder.k")
        if problems:
            raise CrossjaxError("invalid crosscoder config: " + "; ".join(problems))

    @classmethod
    def from_config(cls, section: ConfigDict, *, num_snapshots: int, d_model: int) -> CrosscoderConfig:
        """From the `crosscoder` config section plus the data's S and D (init_norm is the trainer's business)."""
        init_norm = float(section.init_norm)
        if not (init_norm == -1.0 or (math.isfinite(init_norm) and init_norm > 0)):
            raise CrossjaxError(f"crosscoder.init_norm={init_norm} must be > 0, or -1 to grid-search it")
        settings = {f.name: _CASTS[f.type](section[f.name]) for f in dataclasses.fields(cls) if f.name not in _FROM_DATA}
        return cls(num_snapshots=int(num_snapshots), d_model=int(d_model), **settings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrosscoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CrossjaxError(f"unknown crosscoder config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


def default_config() -> ConfigDict:
    """The `crosscoder` config section: F, the dataclass's defaults in field order, then init_norm."""
    defaults = {f.name: f.default for f in dataclasses.fields(CrosscoderConfig) if f.default is not dataclasses.MISSING}
    return ConfigDict({"num_features": _NUM_FEATURES, **defaults, "init_norm": _INIT_NORM})
