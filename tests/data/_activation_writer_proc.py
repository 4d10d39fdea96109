"""A slow activation writer a test can race or SIGKILL: ensure_activations with each block write slowed down.

usage: python tests/data/_activation_writer_proc.py ROOT STORE PROCESS_INDEX PROCESS_COUNT SECONDS_PER_BLOCK
It prints 'claimed' once its claim on the store is published (the first block is being written).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _activations_fixtures as fx  # noqa: E402
from crossjax import activations  # noqa: E402
from crossjax import store as store_lib  # noqa: E402

_write_block = store_lib.ActivationStore.write_block
_announced = []
_DELAY = [0.3]


def slow_write_block(self, *args, **kwargs):
    if not _announced:
        print("claimed", flush=True)
        _announced.append(True)
    out = _write_block(self, *args, **kwargs)
    time.sleep(_DELAY[0])
    return out


if __name__ == "__main__":
    root, store, index, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    _DELAY[0] = float(sys.argv[5])
    store_lib.ActivationStore.write_block = slow_write_block
    activations.ensure_activations(fx.make_config(root, store), None, process_index=index, process_count=count,
                                   progress=False)
    print("done", flush=True)
