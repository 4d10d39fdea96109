"""Logical axes -> device mesh: the one rules table, the mesh, and the shardings of params, state and batches.

Logical axes name what a dimension holds (batch rows, snapshots, model width, dictionary features); the rules table
says which mesh axis splits it. Everything that is placed on devices asks this module, so changing a layout is
one line in `RULES`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from crossjax.errors import CrossjaxError

MESH_AXES = ("data", "snapshot", "feature")

# logical axis -> mesh axis (None: replicated along every mesh axis)
RULES: Mapping[str, str | None] = {
    "batch": "data",
    "snapshot": "snapshot",
    "feature": "feature",
    "embed": None,
}

# logical axes of each crosscoder parameter (crosscoder.init_params)
PARAM_AXES: Mapping[str, tuple[str, ...]] = {
    "W_enc": ("snapshot", "embed", "feature"),
    "W_dec": ("snapshot", "feature", "embed"),
    "b_dec": ("snapshot", "embed"),
    "b_enc": ("feature",),
    "log_threshold": ("feature",),
}

BATCH_AXES = ("batch", "snapshot", "embed")  # activations x [B, S, D]


def mesh_shape(mesh_cfg, num_devices: int, *, allow_subset: bool = False) -> tuple[int, int, int]:
    """Resolve the config's (data, snapshot, feature) sizes; data=-1 takes all devices left over.

    Raises CrossjaxError when the sizes cannot tile `num_devices` exactly (or fit in it, with allow_subset).
    """
    data, snapshot, feature = int(mesh_cfg.data), int(mesh_cfg.snapshot), int(mesh_cfg.feature)
    if snapshot < 1 or feature < 1 or data == 0 or data < -1:
        raise CrossjaxError(
            f"mesh sizes must be positive (data may be -1 for 'all remaining devices'); got data={data}, "
            f"snapshot={snapshot}, feature={feature}. Fix --config.mesh.*")
    if data == -1:
        if num_devices % (snapshot * feature):
            raise CrossjaxError(
                f"mesh.snapshot * mesh.feature = {snapshot * feature} does not divide the {num_devices} devices; "
                "choose sizes whose product divides the device count")
        data = num_devices // (snapshot * feature)
    n = data * snapshot * feature
    if n > num_devices or (n < num_devices and not allow_subset):
        raise CrossjaxError(
            f"mesh data*snapshot*feature = {data}*{snapshot}*{feature} = {n} but {num_devices} devices are "
            "present; set --config.mesh.data=-1 to use all remaining devices")
    return data, snapshot, feature


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'snapshot', 'feature') mesh with Auto axes (jit shardings and constraints drive placement).

    In a single process, explicit sizes whose product is below the device count take the first devices
    (e.g. data=snapshot=feature=1: one device); with several processes the mesh must cover every device.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices), allow_subset=jax.process_count() == 1)
    devices = devices[: shape[0] * shape[1] * shape[2]]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: Sequence[str | None]) -> P:
    """PartitionSpec for a tuple of logical axis names (None = replicated dimension)."""
    out = []
    for a in axes:
        if a is None:
            out.append(None)
        elif a not in RULES:
            raise CrossjaxError(f"unknown logical axis {a!r}; known axes: {sorted(RULES)}")
        else:
            out.append(RULES[a])
    return P(*out)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an activation batch x [B, S, D]: P('data', 'snapshot', None)."""
    return logical_sharding(mesh, BATCH_AXES)


def param_shardings(mesh: Mesh, params_shape: Mapping[str, Any]) -> dict[str, NamedSharding]:
    """One NamedSharding per crosscoder parameter (a dict keyed like PARAM_AXES; shapes only used to check ranks)."""
    out = {}
    for name, leaf in params_shape.items():
        if name not in PARAM_AXES:
            raise CrossjaxError(f"no sharding rule for parameter {name!r}; add it to crossjax.sharding.PARAM_AXES")
        axes = PARAM_AXES[name]
        if len(np.shape(leaf)) != len(axes):
            raise CrossjaxError(f"parameter {name} has shape {np.shape(leaf)} but its logical axes are {axes}")
        out[name] = logical_sharding(mesh, axes)
    return out


def state_shardings(mesh: Mesh, state_shape: Any, params_shape: Mapping[str, Any],
                    extra_axes: Mapping[str, Sequence[str | None]] | None = None) -> Any:
    """Shardings for a whole training-state pytree (params, optimizer moments, counters).

    A leaf takes the sharding of the parameter it mirrors: the innermost dict key on its path that names a parameter,
    provided the shapes agree (Adam's mu/nu). `extra_axes` gives logical axes for other top-level entries of a dict
    state (e.g. a per-feature counter: {"since_fired": ("feature",)}). Everything else is replicated.
    """
    pshard = param_shardings(mesh, params_shape)
    extra = {k: logical_sharding(mesh, v) for k, v in (extra_axes or {}).items()}
    rep = replicated(mesh)

    def pick(path, leaf):
        top = getattr(path[0], "key", None) if path else None
        if isinstance(top, str) and top in extra:
            return extra[top]
        for entry in reversed(path):
            key = getattr(entry, "key", None)
            if isinstance(key, str) and key in pshard:
                if tuple(np.shape(leaf)) == tuple(np.shape(params_shape[key])):
                    return pshard[key]
                break
        return rep

    return jax.tree_util.tree_map_with_path(pick, state_shape)
