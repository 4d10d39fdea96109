"""What a long job tells the person running it: one-line messages and progress bars, each naming its stage.

Every stage (suite, activations, crosscoder, index, compare, ...) speaks through these two functions, so a
message always reads `crossjax.<stage>: ...` on stderr and a bar is labelled with its stage. On several hosts
only process 0 speaks; the caller passes `enabled=False` to silence a stage (e.g. `train.progress=False`).
"""
from __future__ import annotations

import sys


def _is_main_process() -> bool:
    # jax only when it is already imported: the suite's corpus stage speaks before JAX starts
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def say(stage: str, message: str, *, enabled: bool = True) -> None:
    """`crossjax.<stage>: message` on stderr, from process 0 only."""
    if enabled and _is_main_process():
        print(f"crossjax.{stage}: {message}", file=sys.stderr, flush=True)


def progress(stage: str, total: int, *, unit: str, initial: int = 0, enabled: bool = True, unit_scale: bool = False):
    """A tqdm bar labelled with the stage, on stderr, shown by process 0 only (disabled: a silent bar)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                file=sys.stderr, disable=not enabled or total == 0 or not _is_main_process())
