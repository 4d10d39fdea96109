"""What FeatureIndex queries return: an activating row with its context window, a feature's report, a feature's
activation histograms."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    """One activating row and the tokens around it in its context.

    positions/tokens: the window of positions around ``position`` in the same context, in order; a token is -1
    where the store holds no row for that position (BOS, padding and special tokens are not stored).
    text: the window decoded with a tokenizer, the activating token between ``marks`` (None without a tokenizer).
    """

    row: int
    value: float
    token_id: int
    context_id: int
    position: int
    positions: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str | None = None


@dataclasses.dataclass(frozen=True)
class FeatureReport:
    """Everything the index knows about one feature. Arrays over snapshots follow ``snapshots``."""

    index: int
    snapshots: tuple[str, ...]
    frequency: float  # fraction of scanned rows where the feature is active
    frequency_per_snapshot: np.ndarray  # [S] (JumpReLU gates per snapshot; other activations repeat frequency)
    mean_activation: float  # mean activation over the rows where it is active (0 if never)
    norms: np.ndarray  # [S] decoder norm per snapshot
    strength: np.ndarray  # [S] norms / their maximum
    emergence: str | None  # first snapshot where strength >= the index's emergence threshold (None if dead)
    kind: str  # one of evolution.KINDS
    consecutive_cosine: np.ndarray  # [S-1] cosine of decoder vectors at snapshots s and s+1
    cosine_to_final: np.ndarray  # [S] cosine of each snapshot's decoder vector with the last one's
    sharpest_rotation: str | None  # snapshot s+1 of the lowest consecutive cosine (None with one snapshot)
    top_examples: tuple[Example, ...]

    def __str__(self) -> str:
        lines = [f"feature {self.index}: {self.kind}, emerges at {self.emergence}, frequency {self.frequency:.3g}, "
                 f"mean activation {self.mean_activation:.3g}"]
        lines.append("  strength: " + " ".join(f"{n}={v:.2f}" for n, v in zip(self.snapshots, self.strength)))
        for ex in self.top_examples:
            where = f"token {ex.token_id} (context {ex.context_id}, position {ex.position})"
            lines.append(f"  {ex.value:8.3f}  row {ex.row}: " + (ex.text if ex.text is not None else where))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Histogram:
    """A feature's activation histogram at each snapshot over the scanned rows where it is active.

    counts[s, j]: rows whose activation at snapshot s lies in [edges[j], edges[j+1]); the last edge is the power of
    two just above the feature's largest activation (edges are NaN for a feature that never fired).
    """

    feature: int
    snapshots: tuple[str, ...]
    edges: np.ndarray  # [B+1]
    counts: np.ndarray  # [S, B] int64
