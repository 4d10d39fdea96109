"""Every test sees 8 simulated CPU devices; this must run before JAX initialises a backend. XLA_FLAGS is set
too (keeping the user's other flags), so that a child process a test starts without tests/_procs.child_env
also sees 8."""
import os

from _procs import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
