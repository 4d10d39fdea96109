"""Runs `python -m crossjax.activations` (its absl main) with each block write slowed down, so that a test can
SIGKILL it mid-way. argv: the flags of crossjax.activations."""

import sys
import time

from crossjax import activations
from crossjax import store as store_lib

_write_block = store_lib.ActivationStore.write_block


def slow_write_block(self, *args, **kwargs):
    out = _write_block(self, *args, **kwargs)
    time.sleep(0.3)
    return out


if __name__ == "__main__":
    store_lib.ActivationStore.write_block = slow_write_block
    sys.argv = ["crossjax.activations", *sys.argv[1:]]
    activations._main()
