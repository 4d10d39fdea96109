"""Will a training run fit? The memory plan of its training step on a simulated mesh, before renting the devices.

    python -m crossjax.plan --config=experiments/pythia160m.py:x32 --devices=8 --accelerator=v5e
    python -m crossjax.plan --config=experiments/pythia6_9b.py --accelerator=v5p-32 --config.mesh.feature=4
    python -m crossjax.plan --config=experiments/pythia6_9b.py --accelerator=8xh100 --format=json

It builds the run's abstract training state (shapes only; the store's shape comes from the config: the snapshot
count, data.d_model or planted.d_model, the store dtype), lowers and compiles the real training step
(crossjax/trainer.py) for a mesh of --devices simulated CPU devices, and prints per device: parameters, optimizer
state, batch, XLA temporaries, for an on-the-fly run the snapshot models resident beside the step (from their
config.json alone, spread over the devices of one of --hosts hosts), and the total, and whether that fits one
device of --accelerator with --headroom to spare. A TPU slice name gives the device count (v5p-32 is 32
TensorCores: 16 chips, 16 JAX devices), as does 8xh100. When the plan does not fit, the exit code is 2 and the
message names the smallest change that fits, found by compiling candidates: first another mesh on the same
devices (the least feature/snapshot split), else a smaller train.batch_size, or more devices. Temporaries are as
XLA:CPU lays them out; a TPU or GPU compiler fuses differently, so the trainer prints the same plan compiled for
the real devices before it starts, and refuses a step that does not fit them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import types

from absl import flags
from ml_collections import config_flags

from crossjax import cli, config_checks, configs
from crossjax.errors import CrossjaxError


def command_flags(argv: list[str]) -> flags.FlagValues:
    """The command's flags, defined afresh for each parse (the --config flag defines its overrides from argv)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment file, e.g. experiments/pythia160m.py:x32",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_integer("devices", None, "number of devices of the mesh (default: from --accelerator, e.g. v5e-8)",
                         flag_values=fv)
    flags.DEFINE_string("accelerator", None, "v4, v5e, v5p, v6e, a100, h100, h200 or cpu; a TPU slice (v5p-32) or "
                        "N GPUs (8xh100) also gives --devices", flag_values=fv)
    flags.DEFINE_integer("hosts", 1, "hosts the devices are spread over: an on-the-fly run spreads its snapshot "
                         "models over one host's devices", flag_values=fv)
    flags.DEFINE_float("headroom", 0.1, "fraction of each device's memory the plan must leave free", flag_values=fv)
    flags.DEFINE_enum("format", "text", ["text", "json"], "text: the table; json: one JSON object", flag_values=fv)
    flags.DEFINE_bool("search", True, "when the plan does not fit, compile candidates to find one that does",
                      flag_values=fv)
    return fv


_USAGE = ("usage: python -m crossjax.plan --config=experiments/x.py[:variant] (--devices=N | --accelerator=SLICE) "
          "[--accelerator=v5e|v5p|v4|v6e|h100|h200|a100|cpu] [--hosts=1] [--headroom=0.1] [--format=text|json] "
          "[--config.a.b=...]")
SEARCH_DEVICES = 8        # candidates go up to this many times --devices (simulated devices are cheap)
MAX_SIMULATED = 4096
MAX_COMPILES = 12         # each candidate that could fit costs one compilation
BATCH_STEPS = 4           # smaller batches tried: B/2 .. B/16


# ----------------------------------------------------------------------------------------------------------------
# A config's step on any mesh


def store_shape(config) -> tuple[int, int, str]:
    """(S trained, D, store dtype) as the config describes the store, without opening it."""
    s = config_checks.num_snapshots(config)
    if config.data.source == "planted":
        return s, int(config.planted.d_model), str(config.planted.dtype)
    d = int(config.data.d_model)
    if d <= 0:
        raise CrossjaxError("data.d_model=0: the plan does not open the store, so it needs the width of the "
                            "activations; set --config.data.d_model to the model's hidden_size at the hook "
                            "(768 for Pythia-160M, 4096 for Pythia-6.9B)")
    return s, d, str(config.store.dtype)


def planned_steps(config) -> int:
    """The run's length as the trainer will compute it (it only shapes the schedules, not the memory)."""
    from crossjax import trainer
    blocks = config_checks.store_blocks(config) or 1
    block_rows = int(config.planted.block_rows if config.data.source == "planted" else config.store.block_rows)
    rows = max(blocks - int(config.train.heldout_blocks), 1) * block_rows
    return trainer.total_steps(config, rows, rows // int(config.train.batch_size))


def snapshot_models_bytes(config, host_devices: int) -> int:
    """Per-device bytes of the snapshot models an on-the-fly run keeps beside its step (0 for a stored run): every
    snapshot of the store in model.dtype, spread over one host's devices as the activation stage places them.
    Needs only the architecture: the suite's settings, or the first snapshot's config.json."""
    if not config.data.on_the_fly:
        return 0
    from crossjax import activations
    from crossjax.models import load, snapshot_files
    if config.suite.enabled:
        from crossjax.suite import model as suite_model
        arch = suite_model.neox_config(config.suite.to_dict())
    else:
        _, specs = activations.snapshot_specs(config.model)
        try:
            arch = snapshot_files.read_architecture(*specs[0], cache_dir=config.model.get("cache_dir") or None)
        except CrossjaxError as e:
            raise CrossjaxError(f"an on-the-fly run (data.on_the_fly=True) keeps its snapshot models on the devices, "
                                f"and the plan counts them from the first snapshot's config.json, which it cannot "
                                f"read: {e}") from None
    dtype = activations.model_dtype(str(config.model.dtype))
    return len(config_checks.store_snapshots(config)) * load.placed_bytes(arch, dtype, host_devices)


class ConfigPlanner:
    """Memory plans of one config's training step on meshes of the given devices; the abstract state is built
    once, each plan compiles the real step (crossjax.trainer.make_train_step). resident_bytes: what else stays on
    each device (snapshot_models_bytes)."""

    def __init__(self, config, devices, resident_bytes: int = 0):
        from crossjax import trainer
        self.config, self.devices, self.resident_bytes = config, list(devices), int(resident_bytes)
        self.num_snapshots, self.d_model, self.store_dtype = store_shape(config)
        self.steps = planned_steps(config)
        self.cc_cfg, self.tx, self.abstract = trainer.abstract_train_state(
            config, num_snapshots=self.num_snapshots, d_model=self.d_model, total_steps=self.steps)
        self.num_features = self.cc_cfg.num_features
        self.compiles = 0

    def shardings(self, mesh_shape: tuple[int, int, int]) -> dict:
        from crossjax import sharding, trainer
        d, s, f = mesh_shape
        mesh = sharding.make_mesh(types.SimpleNamespace(data=d, snapshot=s, feature=f), self.devices[:d * s * f])
        return trainer.make_shardings(mesh, self.abstract)

    def lower_bound(self, mesh_shape, batch_size: int) -> int:
        from crossjax import memory_plan
        return self.resident_bytes + memory_plan.lower_bound(memory_plan.static_bytes(
            self.abstract, self.shardings(mesh_shape), batch_size=batch_size, store_dtype=self.store_dtype))

    def plan(self, mesh_shape, batch_size: int):
        from crossjax import memory_plan, trainer
        shard = self.shardings(mesh_shape)
        step = trainer.make_train_step(self.cc_cfg, self.tx, self.config, self.steps, shard)
        self.compiles += 1
        return memory_plan.plan_step(step, self.abstract, shard, batch_size=batch_size,
                                     store_dtype=self.store_dtype, resident_bytes=self.resident_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Looking for a plan that fits


@dataclasses.dataclass(frozen=True)
class Alternative:
    change: str        # "mesh" | "batch" | "devices"
    plan: object       # memory_plan.MemoryPlan
    flags: str         # what to add to the command

    @property
    def devices(self) -> int:
        return math.prod(self.plan.mesh.values())


def mesh_candidates(num_devices: int, num_snapshots: int, num_features: int, batch_size: int):
    """(data, snapshot, feature) tilings of num_devices that divide S, F and the batch, least model split first."""
    out = []
    for s in range(1, num_devices + 1):
        if num_devices % s or num_snapshots % s:
            continue
        for f in range(1, num_devices // s + 1):
            d = num_devices // (s * f)
            if (num_devices // s) % f or num_features % f or batch_size % d:
                continue
            out.append((d, s, f))
    return sorted(out, key=lambda m: (m[1] * m[2], m[1]))   # feature split before snapshot split at equal size


def find_fitting(planner: ConfigPlanner, plan, budget) -> list[Alternative]:
    """The smallest change to `plan` that fits `budget`: another mesh on its devices; failing that, the largest
    smaller batch and the fewest more devices that fit. Candidates whose inputs and gradients alone exceed the
    budget are not compiled, and at most MAX_COMPILES are."""
    n, batch = math.prod(plan.mesh.values()), plan.batch_size
    current = tuple(plan.mesh.values())
    shape = (planner.num_snapshots, planner.num_features)
    streams = int(planner.config.data.streams)   # a fixed stream count must divide the batch (config_checks)

    def first_fit(num_devices, batch_size, skip=()):
        for mesh_shape in mesh_candidates(num_devices, *shape, batch_size):
            if mesh_shape in skip or planner.compiles >= MAX_COMPILES:
                continue
            if planner.lower_bound(mesh_shape, batch_size) > budget.usable:
                continue
            candidate = planner.plan(mesh_shape, batch_size)
            if candidate.fits(budget):
                return candidate
        return None

    from crossjax.memory_plan import mesh_flags
    found = first_fit(n, batch, skip=(current,))
    if found is not None:
        return [Alternative("mesh", found, mesh_flags(found.mesh))]
    out = []
    for k in range(1, BATCH_STEPS + 1):
        smaller = batch >> k
        if smaller < 1 or smaller << k != batch:
            break
        if streams and smaller % streams:
            continue
        found = first_fit(n, smaller)
        if found is not None:
            out.append(Alternative("batch", found, f"--config.train.batch_size={smaller} {mesh_flags(found.mesh)}"))
            break
    more = n * 2
    while more <= min(n * SEARCH_DEVICES, len(planner.devices)):
        found = first_fit(more, batch)
        if found is not None:
            out.append(Alternative("devices", found, f"--devices={more} {mesh_flags(found.mesh)}"))
            break
        more *= 2
    return out


def refusal(plan, budget, alternatives: list[Alternative], searched: bool, compiles: int = 0) -> str:
    """The message of a plan that does not fit: by how much, and the changes `find_fitting` found."""
    from crossjax.memory_plan import gib, mesh_text
    n = math.prod(plan.mesh.values())
    head = (f"the plan does not fit: {gib(plan.total)} per device on mesh {mesh_text(plan.mesh)} (batch "
            f"{plan.batch_size}) exceeds the {gib(budget.usable)} a {budget.name} device leaves after "
            f"{budget.headroom:.0%} headroom")
    if not searched:
        return head + "; run again without --nosearch to look for a mesh or batch that fits"
    if not alternatives:
        stopped = f" (the search stopped after {compiles} compilations)" if compiles >= MAX_COMPILES else ""
        return (head + f"; no mesh of {n} to {n * SEARCH_DEVICES} devices and no batch down to "
                f"{plan.batch_size >> BATCH_STEPS} fits{stopped}; parameters and Adam state take "
                f"{gib(plan.params + plan.opt_state)} per device here. Use an accelerator with more memory, more "
                "devices, or fewer crosscoder.num_features or snapshots")
    said = {"mesh": "It fits on the same {n} devices as mesh {mesh}",
            "batch": "It fits on {n} devices with batch {batch}, mesh {mesh}",
            "devices": "It fits on {n} devices{slice} at batch {batch}, mesh {mesh}"}
    options = [said[a.change].format(n=a.devices, mesh=mesh_text(a.plan.mesh), batch=a.plan.batch_size,
                                     slice=slice_text(budget.name, a.devices))
               + f" ({gib(a.plan.total)} per device): {a.flags}" for a in alternatives]
    return head + ". " + "; or: ".join(options)


def slice_text(accelerator: str, num_devices: int) -> str:
    """' (a v5p-32)' for 16 v5p devices, ' (8xh100)' for 8 H100s; '' for anything else."""
    from crossjax.memory_plan import ACCELERATORS
    acc = ACCELERATORS.get(accelerator)
    if acc is None or acc.kind == "cpu":
        return ""
    if acc.kind == "tpu":
        return f" (a {acc.name}-{num_devices * acc.cores_per_device})"
    return f" ({num_devices}x{acc.name})"


# ----------------------------------------------------------------------------------------------------------------
# The command


def parse(argv: list[str]) -> flags.FlagValues:
    """The parsed flags; CrossjaxError for a missing or broken experiment, an unknown override or bad sizes."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        raise CrossjaxError(f"--config is required\n{_USAGE}")
    config = configs.load_experiment(spec)   # a missing file or a variant typo: one line naming the fix
    fv = command_flags(argv)
    try:
        rest = fv(argv)
    except (AttributeError, KeyError, flags.IllegalFlagValueError, flags.Error) as e:
        raise CrossjaxError(cli.unknown_override(config, argv) or f"{e}\n{_USAGE}") from None
    if len(rest) > 1:
        raise CrossjaxError(f"unexpected arguments {rest[1:]}\n{_USAGE}")
    num_devices(fv)
    return fv


def num_devices(fv: flags.FlagValues) -> int:
    """--devices, or the size of the --accelerator slice; the two must agree."""
    from crossjax import memory_plan
    n, spec = fv.devices, fv.accelerator
    if spec is not None:
        _, named = memory_plan.parse_accelerator(spec)
        if named is not None and n is not None and named != n:
            raise CrossjaxError(f"--accelerator={spec} has {named} devices but --devices={n}; give one of them")
        n = n if n is not None else named
    if n is None:
        raise CrossjaxError("give the mesh size: --devices=N, or an accelerator slice such as --accelerator=v5e-8 "
                            f"or --accelerator=8xh100\n{_USAGE}")
    if n < 1:
        raise CrossjaxError(f"--devices={n} must be >= 1")
    if fv.hosts < 1 or n % fv.hosts:
        raise CrossjaxError(f"--hosts={fv.hosts} must be >= 1 and divide the {n} devices")
    return n


def _simulate_devices(count: int, needed: int) -> bool:
    """Ask for `count` simulated CPU devices; False when this process's backend already runs with fewer than
    `needed` (then the command runs in a fresh process)."""
    import jax
    try:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # the backend is already running: use it when it has the devices
        pass
    return jax.default_backend() == "cpu" and jax.device_count() >= needed


def plan_command(fv: flags.FlagValues) -> dict:
    """Plan the parsed --config on --devices; print it; raise CrossjaxError (exit code 2) when it does not fit."""
    import jax

    from crossjax import memory_plan, sharding
    config, n, spec = fv.config, num_devices(fv), fv.accelerator
    config_checks.validate(config, num_devices=n)
    budget = memory_plan.accelerator_budget(spec, num_devices=n, headroom=fv.headroom) if spec else None
    planner = ConfigPlanner(config, jax.devices(), snapshot_models_bytes(config, n // fv.hosts))
    plan = planner.plan(sharding.mesh_shape(config.mesh, n, allow_subset=True), int(config.train.batch_size))
    fits = budget is None or plan.fits(budget)
    alternatives = [] if fits or not fv.search else find_fitting(planner, plan, budget)
    out = dict(plan=plan.to_dict(), fits=fits, budget=None if budget is None else dataclasses.asdict(budget),
               alternatives=[dict(change=a.change, flags=a.flags, plan=a.plan.to_dict()) for a in alternatives])
    if fv.format == "json":
        print(json.dumps(out))
    else:
        print(memory_plan.describe(plan, budget))
        if budget is None:
            print("  (no --accelerator: not compared with a device's memory)")
        elif fits:
            print(f"  mesh flags: {memory_plan.mesh_flags(plan.mesh)}")
    if not fits:
        raise CrossjaxError(refusal(plan, budget, alternatives, fv.search, planner.compiles))
    return out


def main(argv: list[str]) -> int:
    """argv as sys.argv (program name first); returns the exit code (2, through crossjax.cli, for bad input or a
    plan that does not fit)."""
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\n" + command_flags(argv).get_help())
        return 0
    parsed = []
    cli.run("plan", lambda: parsed.append(parse(argv)))
    fv = parsed[0]
    n = num_devices(fv)
    if not _simulate_devices(min(n * SEARCH_DEVICES, max(MAX_SIMULATED, n)), n):
        return subprocess.run([sys.executable, "-m", "crossjax.plan", *argv[1:]]).returncode
    cli.run("plan", lambda: plan_command(fv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
