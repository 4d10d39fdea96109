"""What the activation stage says before it writes: its plan, and the sizes it quotes (crossjax/activations.py)."""
from __future__ import annotations

from crossjax import store as store_lib


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def store_size_bytes(meta) -> int:
    """Uncompressed size of a store's arrays: activations [N, S, D] plus three int32 token arrays [N]."""
    itemsize = store_lib.DTYPES[meta.dtype].itemsize
    return meta.num_rows * (meta.num_snapshots * meta.d_model * itemsize + 3 * 4)


def print_plan(meta, layout, contexts, batch: int, ndev: int, todo, pi: int, pc: int) -> None:
    """The activation stage's plan on stdout: store, contexts, layout, forward, size, units left to write."""
    itemsize = store_lib.DTYPES[meta.dtype].itemsize
    group = min(layout.group_rows, layout.num_rows)
    units = sum(len(v) for v in todo.values())
    all_units = len(todo) * len([g for g in range(layout.num_groups) if g % pc == pi])
    lines = [
        f"activations plan{f' (process {pi} of {pc})' if pc > 1 else ''}:",
        f"  store      {meta.model} @ {meta.hook}: {meta.num_snapshots} snapshots x {meta.num_rows:,} rows x "
        f"d_model {meta.d_model} ({meta.dtype}), {meta.num_blocks} blocks of {meta.block_rows}",
        f"  contexts   {contexts.num_contexts:,} x {contexts.context_len} tokens, "
        f"{contexts.num_valid:,} stored positions (BOS, padding and special tokens excluded)",
        f"  layout     {'shuffled' if layout.shuffle else 'in order'}, {layout.num_groups} group(s) of up to "
        f"{group:,} rows; group buffer {fmt_bytes(group * meta.d_model * itemsize)}",
        f"  forward    {batch} contexts per call over {ndev} device{'s' if ndev > 1 else ''}",
        f"  size       about {fmt_bytes(store_size_bytes(meta))} on disk before compression",
        f"  to do      {units} of {all_units} (group, snapshot) units"
        f"{'; nothing left' if units == 0 else ''}",
    ]
    print("\n".join(lines), flush=True)
