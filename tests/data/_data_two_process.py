"""One of two processes joined by jax.distributed on localhost; each writes what its devices received.

usage: python tests/data/_data_two_process.py PORT PROCESS_ID STORE OUT.npz
The batch settings here are mirrored by tests/data/test_data.py::test_two_processes_build_the_single_process_batches.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
port, pid, store_url, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from crossjax.data import make_loader  # noqa: E402
from crossjax.errors import CrossjaxError  # noqa: E402
from crossjax.store import ActivationStore  # noqa: E402

GLOBAL_BATCH, SEED, WINDOW_BLOCKS, EPOCHS, STREAMS = 32, 3, 2, 2, 2

store = ActivationStore.open(store_url)
mesh = jax.make_mesh((4, 2), ("data", "snapshot"), axis_types=(AxisType.Auto,) * 2)
sharding = NamedSharding(mesh, P("data", "snapshot", None))

try:
    make_loader(store, global_batch=31, seed=SEED, sharding=None)
    odd_batch_error = ""
except CrossjaxError as e:
    odd_batch_error = str(e)

loader = make_loader(store, global_batch=GLOBAL_BATCH, seed=SEED, sharding=sharding, window_blocks=WINDOW_BLOCKS,
                     num_epochs=EPOCHS, with_tokens=True, streams=STREAMS)
acts, tokens, shardings_ok = [], [], True
for batch in loader:
    a = batch["acts"]
    shardings_ok &= a.shape == (GLOBAL_BATCH, store.meta.num_snapshots, store.meta.d_model)
    shardings_ok &= a.sharding == sharding
    seen = np.full(a.shape, np.nan, np.float32)  # NaN where another process's devices hold the values
    for shard in a.addressable_shards:
        seen[shard.index] = np.asarray(shard.data, np.float32)
    acts.append(seen)
    t = np.full(GLOBAL_BATCH, -1, np.int64)
    for shard in batch["token_ids"].addressable_shards:
        t[shard.index] = np.asarray(shard.data)
    tokens.append(t)

# A mesh whose snapshot axis is split between the processes: each holds every row of half the snapshots.
by_snapshot = NamedSharding(
    jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4).T, ("data", "snapshot"),
                      axis_types=(AxisType.Auto,) * 2),
    P("data", "snapshot", None))
split = make_loader(store, global_batch=GLOBAL_BATCH, seed=SEED, sharding=by_snapshot, window_blocks=WINDOW_BLOCKS,
                    num_epochs=1, streams=STREAMS)
acts_by_snapshot = []
for batch in split:
    seen = np.full(batch["acts"].shape, np.nan, np.float32)
    for shard in batch["acts"].addressable_shards:
        seen[shard.index] = np.asarray(shard.data, np.float32)
    acts_by_snapshot.append(seen)
split.close()

np.savez(out, acts=np.stack(acts), acts_by_snapshot=np.stack(acts_by_snapshot), token_ids=np.stack(tokens), local_rows=loader.local_rows,
         reads=json.dumps([list(w) for w in loader.blocks_read]), odd_batch_error=odd_batch_error,
         shardings_ok=bool(shardings_ok))
loader.close()
jax.distributed.shutdown()
