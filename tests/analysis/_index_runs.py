"""Small FeatureIndex inputs without training: an activation store whose second half repeats its first (so equal
activations fall on both sides of any split of the rows) and workdirs holding a random crosscoder export."""
import hashlib
import json

import numpy as np

from crossjax import crosscoder, crosscoder_export
from crossjax.array_store import store_from_arrays
from crossjax.summary import RunSummary

S, D, F = 3, 8, 32          # F divides over 8 and over 4 devices
ROWS, BLOCK_ROWS = 600, 128  # 5 blocks, the last one short


def make_store(url: str):
    rng = np.random.default_rng(11)
    half = rng.normal(size=(ROWS // 2, S, D)) * np.array([0.5, 1.0, 1.5])[None, :, None]
    return store_from_arrays(np.concatenate([half, half]), url=url, block_rows=BLOCK_ROWS,
                             token_ids=rng.integers(0, 1000, ROWS))


def make_run(root, store, activation: str, seed: int = 0):
    """root/export and root/summary.json naming `store`, as training leaves them; returns root."""
    cfg = crosscoder.CrosscoderConfig(num_snapshots=S, d_model=D, num_features=F, activation=activation, k=4)
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=shape).astype(np.float32) * 0.5 for k, shape in crosscoder.param_shapes(cfg).items()}
    params["W_dec"] *= rng.uniform(0.2, 1.5, size=(S, F, 1)).astype(np.float32)  # gates differ per snapshot
    params["log_threshold"] = np.log(rng.uniform(0.3, 1.2, size=F)).astype(np.float32)
    crosscoder_export.export_params(params, np.ones(S, np.float32), cfg, str(root / "export"))
    (root / "config.json").write_text(json.dumps({"crosscoder": {"num_features": F}}))
    RunSummary(workdir=str(root), store=store.url, steps=1, tokens=1, snapshots=list(store.meta.snapshots),
               num_features=F, init_norm=1.0, scales=[1.0] * S, export=str(root / "export"), evolution={},
               evals={}).write(str(root))
    return root


def index_digest(index) -> str:
    """A hash of what an index answers through its public queries (frequencies, means, every feature's top
    examples per snapshot and histograms)."""
    h = hashlib.sha256()
    for a in (index.counts, index.counts_per_snapshot, index.mean_activation):
        h.update(a.tobytes())
    for f in range(index.num_features):
        for s in [None, *range(len(index.snapshots))]:
            h.update(repr([(e.row, e.value, e.tokens) for e in index.top_examples(f, snapshot=s)]).encode())
        hist = index.histogram(f)
        h.update(hist.counts.tobytes() + hist.edges.tobytes())
    return h.hexdigest()
