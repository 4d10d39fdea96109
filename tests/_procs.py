"""Environments for the child processes tests start: the CPU backend with an explicit device count, whatever
XLA_FLAGS the user's shell has (a GPU user's flags, or an empty value, must not change a child's devices)."""
import contextlib
import os
import re
import signal

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


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a jax.distributed coordinator)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[list[str]], log_dir, name: str, *, env: dict, cwd=None, timeout: float = 300) -> None:
    """Start every command at once (the processes of one jax.distributed job), wait for all, kill the rest when
    one hangs, and fail with the tail of each process's log (log_dir/<name><i>.log) unless all exit 0."""
    import subprocess
    paths = [os.path.join(log_dir, f"{name}{i}.log") for i in range(len(commands))]
    logs = [open(p, "w") for p in paths]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=log) for cmd, log in zip(commands, logs)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    assert codes == [0] * len(commands), "\n".join(open(p).read()[-3000:] for p in paths)


@contextlib.contextmanager
def reaped(proc):
    """`proc` inside the block; on leaving it, killed and waited for if it still runs, so that a failed assertion
    leaves no process behind."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def sigkill(proc) -> None:
    """SIGKILL `proc` (a writer killed from outside, mid-work) and wait until it has ended."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
