"""Environments for the child processes tests start: the CPU backend with an explicit device count, whatever
XLA_FLAGS the user's shell has (a GPU user's flags, or an empty value, must not change a child's devices)."""
import os
import re

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def xla_flags(devices: int | None, flags: str | None = None) -> str:
    """`flags` (default: $XLA_FLAGS) without any device-count flag, plus ours when `devices` is given."""
    kept = _DEVICE_FLAG.sub("", os.environ.get("XLA_FLAGS", "") if flags is None else flags).split()
    if devices is not None:
        kept.append(f"--xla_force_host_platform_device_count={int(devices)}")
    return " ".join(kept)


def child_env(devices: int | None, **extra: str) -> dict:
    """os.environ for a child on the CPU backend with `devices` simulated devices (None: the child sets its own
    count, e.g. with jax.config.update("jax_num_cpu_devices", n)), plus `extra` variables."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
    return env
