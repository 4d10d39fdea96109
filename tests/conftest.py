"""Every test sees 8 simulated CPU devices; this must run before JAX initialises a backend. XLA_FLAGS is set
too (keeping the user's other flags), so that a child process a test starts without tests/_procs.child_env
also sees 8. CROSSJAX_CACHE points at a fresh directory, so the tests behave as on a fresh machine."""
import atexit
import os
import shutil
import tempfile

from _procs import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(8)
os.environ["JAX_PLATFORMS"] = "cpu"
# no test reads or writes the user's suite cache (~/.cache/crossjax): what a test needs, it builds
os.environ["CROSSJAX_CACHE"] = tempfile.mkdtemp(prefix="crossjax-test-cache-")
atexit.register(shutil.rmtree, os.environ["CROSSJAX_CACHE"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
