"""One of two processes joined by jax.distributed on localhost (4 CPU devices each): builds the FeatureIndex of
every build in SPEC.json, saves it under OUT/p<PROCESS_ID>/<name> (only process 0 writes) and writes the digest of
what its own copy answers to OUT/p<PROCESS_ID>/<name>.digest; a build that fails writes its error to
OUT/p<PROCESS_ID>/<name>.error instead.

usage: python tests/analysis/_index_two_process.py PORT PROCESS_ID SPEC.json OUT
SPEC.json: {name: {"workdir": ..., "store_url": ... or null, "build": {FeatureIndex.build keyword arguments},
                   "process": {process id: {keyword arguments that this process changes}} (optional)}}
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
port, pid, spec_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from _index_runs import index_digest  # noqa: E402
from crossjax.analysis import FeatureIndex  # noqa: E402
from crossjax.errors import CrossjaxError  # noqa: E402

mine = os.path.join(out, f"p{pid}")
os.makedirs(mine, exist_ok=True)
with open(spec_file) as f:
    spec = json.load(f)
for name, build in spec.items():
    try:
        args = {**build["build"], **build.get("process", {}).get(str(pid), {})}  # a process's own arguments
        index = FeatureIndex.build(build["workdir"], build["store_url"], progress=False, **args)
    except CrossjaxError as e:
        with open(os.path.join(mine, name + ".error"), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        continue
    index.save(os.path.join(mine, name))  # process 0 writes it; the other holds the same index
    with open(os.path.join(mine, name + ".digest"), "w") as f:
        f.write(index_digest(index))
jax.distributed.shutdown()
