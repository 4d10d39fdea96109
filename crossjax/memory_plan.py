"""How much memory one training step takes on each device, and how much a device has.

    plan = memory_plan.plan_step(train_step, abstract_state, shardings, batch_size=4096, store_dtype="float16")
    print(memory_plan.describe(plan, memory_plan.accelerator_budget("v5e", num_devices=8)))

The step is lowered and compiled for shapes only (jax.ShapeDtypeStruct with the run's shardings): nothing is
allocated. Parameters, optimizer state and batch are counted from their shard shapes; XLA's compiled memory
analysis gives the temporaries (gradients, activations, buffers of the collectives) and the arguments as the
compiler lays them out, padding included. All numbers are per device: the mesh splits every array evenly.

Device memory comes from a table of accelerators (`python -m crossjax.plan --accelerator=v5e`) or, on the
devices a run actually has, from what the runtime reports (`device_budget`). The trainer calls
`check_before_training` with its real step before it allocates anything; `python -m crossjax.plan` (crossjax/plan.py)
plans a config for simulated meshes of any size.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from crossjax import console, sharding
from crossjax.errors import CrossjaxError

GiB = 2 ** 30
HEADROOM = 0.1   # a plan must leave this fraction of a device's memory free (fragmentation, runtime buffers)


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One kind of device as JAX sees it: memory per JAX device, and how a slice name counts them."""
    name: str
    memory: int                # bytes of one JAX device (a TPU chip, a GPU)
    cores_per_device: int = 1  # TPU slice names count TensorCores: v4 and v5p chips hold two, one JAX device
    kind: str = "tpu"          # "tpu" | "gpu" | "cpu"


ACCELERATORS = {a.name: a for a in (
    Accelerator("v4", 32 * GiB, 2),
    Accelerator("v5e", 16 * GiB),
    Accelerator("v5p", 95 * GiB, 2),
    Accelerator("v6e", 32 * GiB),
    Accelerator("a100", 80 * GiB, kind="gpu"),
    Accelerator("h100", 80 * GiB, kind="gpu"),
    Accelerator("h200", 141 * GiB, kind="gpu"),
    Accelerator("cpu", 0, kind="cpu"),  # this machine's memory, shared by the simulated devices
)}


def parse_accelerator(spec: str) -> tuple[Accelerator, int | None]:
    """'v5e' -> (v5e, None); 'v5p-32' (a slice of 32 TensorCores) -> (v5p, 16 devices); '8xh100' -> (h100, 8)."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+?)(?:-(\d+))?", str(spec).strip().lower())
    known = ", ".join(ACCELERATORS)
    if m is None or m.group(2) not in ACCELERATORS or (m.group(1) and m.group(3)):
        raise CrossjaxError(f"unknown accelerator {spec!r}: use one of {known}, a TPU slice such as v5e-8 or "
                            "v5p-32, or N x a GPU such as 8xh100")
    acc = ACCELERATORS[m.group(2)]
    if m.group(3):
        if acc.kind != "tpu":
            raise CrossjaxError(f"{spec!r}: only TPU slices are named by their size; write e.g. 8x{acc.name}")
        cores = int(m.group(3))
        if cores % acc.cores_per_device:
            raise CrossjaxError(f"{spec!r}: a {acc.name} slice counts TensorCores, {acc.cores_per_device} per chip; "
                                f"use a multiple of {acc.cores_per_device}")
        return acc, cores // acc.cores_per_device
    return acc, int(m.group(1)) if m.group(1) else None


@dataclasses.dataclass(frozen=True)
class Budget:
    """The memory of one device and the share a plan may use."""
    name: str        # what the memory belongs to, as printed: "v5e", "cuda device", ...
    memory: int      # bytes per device
    headroom: float  # fraction kept free
    source: str = ""  # where the figure comes from, when not the accelerator table

    @property
    def usable(self) -> int:
        return int(self.memory * (1.0 - self.headroom))


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def accelerator_budget(spec: str, *, num_devices: int, headroom: float = HEADROOM) -> Budget:
    """The budget of one device of `spec` (see parse_accelerator); 'cpu' shares this machine's memory out."""
    acc, _ = parse_accelerator(spec)
    if not 0.0 <= float(headroom) < 1.0:
        raise CrossjaxError(f"--headroom={headroom} must lie in [0, 1)")
    if acc.kind == "cpu":
        total = host_memory()
        return Budget("cpu", total // max(num_devices, 1), headroom,
                      f"this machine's {total / GiB:.1f} GiB shared by {_count(num_devices, 'device')}")
    if acc.kind == "gpu":
        var = next((v for v in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION") if os.environ.get(v)),
                   None)
        if var is not None:  # JAX's allocator then keeps to this share of each GPU
            fraction = float(os.environ[var])
            return Budget(acc.name, int(acc.memory * fraction), headroom,
                          f"{fraction:.0%} of {acc.memory / GiB:.0f} GiB by {var}")
    return Budget(acc.name, acc.memory, headroom)


def device_budget(devices: Sequence[jax.Device], headroom: float = HEADROOM) -> Budget | None:
    """The budget of the devices a run has: the runtime's memory limit (GPU, TPU) or, on CPU, this machine's
    memory shared by its local devices; None when the backend reports nothing."""
    device = devices[0]
    if device.platform == "cpu":
        local = max(1, sum(d.process_index == device.process_index for d in devices))
        total = host_memory()
        return Budget("cpu", total // local, headroom,
                      f"this machine's {total / GiB:.1f} GiB shared by {_count(local, 'device')}")
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # a backend without memory statistics: nothing to compare with
        limit = None
    if not limit:
        return None
    return Budget(getattr(device, "device_kind", device.platform), int(limit), headroom, "as the runtime reports it")


# ----------------------------------------------------------------------------------------------------------------
# The plan of one step


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step on one mesh."""
    mesh: dict               # {"data": .., "snapshot": .., "feature": ..}
    batch_size: int          # global rows per step
    num_snapshots: int       # S
    d_model: int             # D
    num_features: int        # F
    params: int              # the crosscoder's parameters (float32)
    opt_state: int           # Adam's mu and nu (float32) and its counters
    other_state: int         # step, per-feature counters
    batch: int               # the activations [B, S, D] in the store dtype, and the scales
    arguments: int           # all inputs as XLA lays them out (the four above, plus any padding)
    temporaries: int         # XLA's temporaries: gradients, activations, collective buffers
    outputs: int             # outputs that do not reuse a donated input (the step's metrics)
    code: int                # generated code
    platform: str            # what the step was compiled for ("cpu", "tpu", "gpu")
    resident: int = 0        # held on the device beside the step: the snapshot models of on-the-fly training

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs + self.code + self.resident

    @property
    def padding(self) -> int:
        return max(0, self.arguments - (self.params + self.opt_state + self.other_state + self.batch))

    def fits(self, budget: Budget) -> bool:
        return self.total <= budget.usable

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (or arrays)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def step_arguments(abstract_state: dict, shardings: dict, *, batch_size: int, store_dtype: str):
    """(state, acts [B,S,D], scales [S]) as ShapeDtypeStructs carrying the step's input shardings."""
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                         shardings["state"])
    s, d = abstract_state["params"]["b_dec"].shape
    acts = jax.ShapeDtypeStruct((int(batch_size), s, d), jnp.dtype(store_dtype), sharding=shardings["batch"])
    scales = jax.ShapeDtypeStruct((s,), jnp.float32, sharding=sharding.replicated(shardings["mesh"]))
    return state, acts, scales


def static_bytes(abstract_state: dict, shardings: dict, *, batch_size: int, store_dtype: str) -> dict:
    """Per-device bytes known without compiling: params, opt_state, other_state, batch."""
    state, acts, scales = step_arguments(abstract_state, shardings, batch_size=batch_size, store_dtype=store_dtype)
    other = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
    return dict(params=shard_bytes(state["params"]), opt_state=shard_bytes(state["opt_state"]),
                other_state=shard_bytes(other), batch=shard_bytes((acts, scales)))


def lower_bound(static: dict) -> int:
    """Bytes a step needs at the least: its inputs and a gradient the size of the parameters."""
    return sum(static.values()) + static["params"]


def plan_step(train_step, abstract_state: dict, shardings: dict, *, batch_size: int, store_dtype: str,
              resident_bytes: int = 0) -> MemoryPlan:
    """Compile `train_step` (crossjax.trainer.make_train_step) for shapes only and measure it per device;
    resident_bytes: what else stays on each device meanwhile (on the fly: the snapshot models' weights).

    The compilation is cached by jit: calling the same train_step on arrays of these shapes and shardings
    afterwards does not compile again.
    """
    args = step_arguments(abstract_state, shardings, batch_size=batch_size, store_dtype=store_dtype)
    compiled = train_step.lower(*args).compile()
    stats = compiled.memory_analysis()
    static = static_bytes(abstract_state, shardings, batch_size=batch_size, store_dtype=store_dtype)
    if stats is None:  # a backend without the analysis: count the inputs, and a gradient as the least temporary
        arguments, temporaries, outputs, code = sum(static.values()), static["params"], 0, 0
    else:
        arguments = int(stats.argument_size_in_bytes)
        temporaries = int(stats.temp_size_in_bytes)
        outputs = max(0, int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes))
        code = int(stats.generated_code_size_in_bytes)
    mesh = shardings["mesh"]
    s, d, f = abstract_state["params"]["W_enc"].shape
    return MemoryPlan(mesh=dict(mesh.shape), batch_size=int(batch_size), num_snapshots=s, d_model=d,
                      num_features=f, arguments=arguments, temporaries=temporaries, outputs=outputs, code=code,
                      platform=mesh.devices.flat[0].platform, resident=int(resident_bytes), **static)


# ----------------------------------------------------------------------------------------------------------------
# Reading a plan


def gib(n: int) -> str:
    """Bytes as GiB, or MiB below a tenth of a GiB (small arrays of a big plan, or a small plan)."""
    return f"{n / GiB:.3f} GiB" if n >= GiB // 10 else f"{n / 2 ** 20:.3f} MiB"


def mesh_text(mesh: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items())


def mesh_flags(mesh: dict) -> str:
    return " ".join(f"--config.mesh.{k}={v}" for k, v in mesh.items())


def describe(plan: MemoryPlan, budget: Budget | None) -> str:
    """The plan as a table, per device, with the verdict against `budget` (none: no verdict)."""
    m = plan.mesh
    rows = plan.batch_size // m["data"]
    snaps = plan.num_snapshots // m["snapshot"]
    n = math.prod(m.values())
    params = 2 * plan.num_snapshots * plan.d_model * plan.num_features + 2 * plan.num_features \
        + plan.num_snapshots * plan.d_model
    compiled = "simulated " if plan.platform == "cpu" and n > 1 else ""
    lines = [
        f"memory per device of one training step, compiled for {_count(n, compiled + plan.platform + ' device')}:",
        f"  mesh {mesh_text(m)}; batch {plan.batch_size} rows ({rows} rows x {snaps} snapshots per device)",
        f"  crosscoder S={plan.num_snapshots} D={plan.d_model} F={plan.num_features:,} ({params:,} parameters)",
        f"  {'parameters':<17}{gib(plan.params):>13}",
        f"  {'optimizer state':<17}{gib(plan.opt_state):>13}   Adam mu and nu",
        f"  {'other state':<17}{gib(plan.other_state):>13}   step, per-feature counters",
        f"  {'batch':<17}{gib(plan.batch):>13}",
    ]
    if plan.padding:
        lines.append(f"  {'layout padding':<17}{gib(plan.padding):>13}")
    note = " (as XLA:CPU lays them out)" if plan.platform == "cpu" else ""
    lines += [f"  {'XLA temporaries':<17}{gib(plan.temporaries):>13}   gradients, activations{note}",
              f"  {'outputs, code':<17}{gib(plan.outputs + plan.code):>13}"]
    if plan.resident:
        lines.append(f"  {'snapshot models':<17}{gib(plan.resident):>13}   weights resident for on-the-fly rows")
    lines.append(f"  {'total':<17}{gib(plan.total):>13}")
    if budget is not None:
        verdict = "fits" if plan.fits(budget) else "does NOT fit"
        source = f" ({budget.source})" if budget.source else ""
        lines.append(f"  {budget.name}: {gib(budget.memory)} per device{source}, {gib(budget.usable)} after "
                     f"{budget.headroom:.0%} headroom: {verdict}")
    return "\n".join(lines)


def check_before_training(train_step, abstract_state: dict, shardings: dict, *, batch_size: int,
                          store_dtype: str, stage: str = "crosscoder", resident_bytes: int = 0) -> MemoryPlan:
    """Plan the step on the run's own devices, say the plan, and raise CrossjaxError before anything is allocated
    when it needs more than a device has. Within the headroom it only warns: the devices' own limit is exact.
    resident_bytes: already on each device beside the step (on the fly: the snapshot models), counted in."""
    plan = plan_step(train_step, abstract_state, shardings, batch_size=batch_size, store_dtype=store_dtype,
                     resident_bytes=resident_bytes)
    budget = device_budget(list(shardings["mesh"].devices.flat))
    console.say(stage, describe(plan, budget))
    if budget is not None and plan.total > budget.memory:
        n = math.prod(plan.mesh.values())
        raise CrossjaxError(
            f"the training step needs {gib(plan.total)} per device on mesh {mesh_text(plan.mesh)} but a "
            f"{budget.name} device has {gib(budget.memory)}; nothing was allocated. Find a mesh or batch that fits "
            f"with `python -m crossjax.plan --config=... --devices={n} --accelerator=...` (the same --config "
            "overrides as this run), then pass the --config.mesh.* or --config.train.batch_size it prints")
    if budget is not None and not plan.fits(budget):
        console.say(stage, f"warning: the step uses more than {1 - budget.headroom:.0%} of each device's memory; "
                    "fragmentation may still exhaust it")
    return plan
