"""crossjax.sharding: mesh resolution, the rules table, and the shardings of params, optimizer state and batches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P
from ml_collections import ConfigDict

from crossjax import sharding
from crossjax.errors import CrossjaxError

S, D, F = 2, 4, 8


def _mesh_cfg(data, snapshot, feature):
    return ConfigDict(dict(data=data, snapshot=snapshot, feature=feature))


def _params():
    return dict(W_enc=jnp.zeros((S, D, F)), W_dec=jnp.zeros((S, F, D)), b_dec=jnp.zeros((S, D)),
                b_enc=jnp.zeros((F,)), log_threshold=jnp.zeros((F,)))


@pytest.mark.parametrize("cfg,expected", [((-1, 1, 1), (8, 1, 1)), ((-1, 2, 2), (2, 2, 2)), ((1, 1, 8), (1, 1, 8)),
                                          ((-1, 4, 1), (2, 4, 1))])
def test_mesh_shape_resolves_data_axis(cfg, expected):
    assert sharding.mesh_shape(_mesh_cfg(*cfg), 8) == expected


@pytest.mark.parametrize("cfg,fragment", [((-1, 3, 1), "does not divide"), ((2, 2, 1), "set --config.mesh.data=-1"),
                                          ((-1, 0, 1), "must be positive"), ((-2, 1, 1), "must be positive")])
def test_mesh_shape_errors_name_the_fix(cfg, fragment):
    with pytest.raises(CrossjaxError, match=fragment):
        sharding.mesh_shape(_mesh_cfg(*cfg), 8)


def test_explicit_smaller_mesh_takes_the_first_devices():
    assert sharding.mesh_shape(_mesh_cfg(1, 1, 1), 8, allow_subset=True) == (1, 1, 1)
    mesh = sharding.make_mesh(_mesh_cfg(1, 1, 1))
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    with pytest.raises(CrossjaxError, match="16 but 8 devices"):
        sharding.make_mesh(_mesh_cfg(4, 2, 2))


def test_make_mesh_has_auto_axes_and_names():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    assert mesh.axis_names == ("data", "snapshot", "feature")
    assert dict(mesh.shape) == {"data": 2, "snapshot": 2, "feature": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_rules_table_gives_the_documented_specs():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    specs = {k: v.spec for k, v in sharding.param_shardings(mesh, _params()).items()}
    assert specs == {"W_enc": P("snapshot", None, "feature"), "W_dec": P("snapshot", "feature", None),
                     "b_dec": P("snapshot", None), "b_enc": P("feature"), "log_threshold": P("feature")}
    assert sharding.batch_sharding(mesh).spec == P("data", "snapshot", None)
    with pytest.raises(CrossjaxError, match="unknown logical axis"):
        sharding.logical_spec(("batch", "vocab"))


def test_param_shardings_reject_unknown_or_misranked_params():
    mesh = sharding.make_mesh(_mesh_cfg(-1, 1, 1))
    with pytest.raises(CrossjaxError, match="no sharding rule"):
        sharding.param_shardings(mesh, {"W_other": jnp.zeros((2,))})
    with pytest.raises(CrossjaxError, match="logical axes"):
        sharding.param_shardings(mesh, {"W_enc": jnp.zeros((2, 2))})


def test_placed_params_split_as_the_table_says():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    placed = jax.device_put(_params(), sharding.param_shardings(mesh, _params()))
    # each device holds 1/2 of the snapshots and 1/2 of the features, and all of embed
    assert placed["W_enc"].addressable_shards[0].data.shape == (S // 2, D, F // 2)
    assert placed["W_dec"].addressable_shards[0].data.shape == (S // 2, F // 2, D)
    assert placed["b_enc"].addressable_shards[0].data.shape == (F // 2,)


def test_optimizer_state_follows_its_parameters():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    params = _params()
    tx = optax.multi_transform({"a": optax.adam(1e-3), "b": optax.adam(1e-4)},
                               lambda p: {k: ("b" if k == "log_threshold" else "a") for k in p})
    state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 since_fired=jnp.zeros((F,), jnp.int32))
    shard = sharding.state_shardings(mesh, jax.eval_shape(lambda: state), params, {"since_fired": ("feature",)})
    flat = jax.tree_util.tree_flatten_with_path(shard)[0]
    shapes = dict(jax.tree_util.tree_flatten_with_path(state)[0])
    pspec = {k: v.spec for k, v in sharding.param_shardings(mesh, params).items()}
    checked = 0
    for path, s in flat:
        keys = [getattr(e, "key", None) for e in path]
        leaf = shapes[path]
        named = [k for k in keys if k in pspec]
        if keys[0] == "since_fired":
            assert s.spec == P("feature")
        elif named and np.shape(leaf) == np.shape(params[named[-1]]):
            assert s.spec == pspec[named[-1]], keys
            checked += 1
        else:
            assert s.spec == P(), keys  # counters are replicated
    assert checked == 3 * len(params)  # each parameter, its mu and its nu
    # and jit can produce the state directly in that layout
    born = jax.jit(lambda: state, out_shardings=shard)()
    assert born["opt_state"].inner_states["a"].inner_state[0].mu["W_dec"].sharding.spec == P("snapshot", "feature", None)
