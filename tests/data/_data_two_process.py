"""One of two processes joined by jax.distributed on localhost; each writes what its devices received.

usage: python tests/data/_data_two_process.py PORT PROCESS_ID STORE OUT.npz POSITION.json
POSITION.json is a loader position saved by one process (after RESUME_AT batches of the default loader).
The batch settings here are mirrored by tests/data/test_data.py::test_two_processes_build_the_single_process_batches.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
port, pid, store_url, out, position_in = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from crossjax.data import make_loader  # noqa: E402
from crossjax.errors import CrossjaxError  # noqa: E402
from crossjax.store import ActivationStore  # noqa: E402

GLOBAL_BATCH, SEED, WINDOW_BLOCKS, EPOCHS, STREAMS, RESUME_AT = 32, 3, 2, 2, 2, 5
UNEVEN_BATCH, UNEVEN_STREAMS = 48, 3   # 24 rows per process: the middle stream's piece is split between them

store = ActivationStore.open(store_url)
mesh = jax.make_mesh((4, 2), ("data", "snapshot"), axis_types=(AxisType.Auto,) * 2)
sharding = NamedSharding(mesh, P("data", "snapshot", None))


def held(array):
    """The global array with NaN (or -1) where another process's devices hold the values."""
    seen = np.full(array.shape, np.nan if array.dtype.kind == "f" else -1,
                   np.float32 if array.dtype.kind == "f" else np.int64)
    for shard in array.addressable_shards:
        seen[shard.index] = np.asarray(shard.data)
    return seen


def default_loader(shard, **kw):
    """The default settings: no stream count given."""
    return make_loader(store, global_batch=GLOBAL_BATCH, seed=SEED, sharding=shard, window_blocks=WINDOW_BLOCKS,
                       **kw)


try:
    make_loader(store, global_batch=31, seed=SEED, sharding=None)
    odd_batch_error = ""
except CrossjaxError as e:
    odd_batch_error = str(e)

loader = default_loader(sharding, num_epochs=EPOCHS, with_tokens=True)
acts, tokens, shardings_ok, positions = [], [], True, []
for batch in loader:
    a = batch["acts"]
    shardings_ok &= a.shape == (GLOBAL_BATCH, store.meta.num_snapshots, store.meta.d_model)
    shardings_ok &= a.sharding == sharding
    acts.append(held(a))
    tokens.append(held(batch["token_ids"]))
    if len(acts) == RESUME_AT:
        positions.append(json.dumps(loader.get_state(), sort_keys=True))   # saved here, restored in one process

# A mesh whose snapshot axis is split between the processes: each holds every row of half the snapshots.
by_snapshot = NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4).T, ("data", "snapshot"),
                      axis_types=(AxisType.Auto,) * 2),
    P("data", "snapshot", None))
split = default_loader(by_snapshot, num_epochs=1)
acts_by_snapshot = [held(b["acts"]) for b in split]
split.close()

# A position saved by one process, restored here: the batches that come next.
resumed = default_loader(sharding, num_epochs=EPOCHS)
resumed.set_state(json.load(open(position_in)))
acts_resumed = [held(b["acts"]) for b in resumed]
resumed.close()

# Two streams, one per process: each reads only its own stream's windows.
shared = make_loader(store, global_batch=GLOBAL_BATCH, seed=SEED, sharding=sharding, window_blocks=WINDOW_BLOCKS,
                     num_epochs=EPOCHS, streams=STREAMS)
acts_streams = [held(b["acts"]) for b in shared]
shared.close()

# Three streams on two processes: a stream's piece split between them still gives the one-process batches.
rows_only = NamedSharding(jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)), P("data", None, None))
uneven = make_loader(store, global_batch=UNEVEN_BATCH, seed=SEED, sharding=rows_only, window_blocks=WINDOW_BLOCKS,
                     num_epochs=1, streams=UNEVEN_STREAMS)
acts_uneven = [held(b["acts"]) for b in uneven]
uneven.close()

np.savez(out, acts=np.stack(acts), acts_by_snapshot=np.stack(acts_by_snapshot), token_ids=np.stack(tokens),
         acts_resumed=np.stack(acts_resumed), acts_streams=np.stack(acts_streams), acts_uneven=np.stack(acts_uneven),
         local_rows=loader.local_rows, position=positions[0],
         reads=json.dumps([list(w) for w in shared.blocks_read]), odd_batch_error=odd_batch_error,
         shardings_ok=bool(shardings_ok))
loader.close()
jax.distributed.shutdown()
