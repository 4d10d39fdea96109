"""Spliced-in loss (model snapshots, eval.spliced_tokens > 0): per snapshot, the LM's next-token loss clean, with
the crosscoder's reconstruction spliced in at the hook, and with the hook zero-ablated (PAPER.md), over
eval.spliced_tokens tokens of tokens.split = eval.spliced_split (the text and jsonl sources have no splits: their
documents are drawn with another seed). Measured on process 0 from the exported weights.

Returns {snapshot name: {clean_loss, spliced_loss, zero_ablated_loss, loss_recovered, delta_loss, pairs}}.
"""
from __future__ import annotations

import copy

from crossjax import console


def evaluate(run) -> dict | None:
    config = run.config
    if config.data.source != "snapshots" or int(config.eval.spliced_tokens) <= 0:
        return None
    import jax
    if jax.process_index() != 0:
        return None
    from crossjax import activations, tokens
    from crossjax.analysis.spliced import spliced_loss
    dirs = activations.snapshot_dirs(config.model, run.snapshots)
    section = copy.deepcopy(config.tokens)
    section.split = str(config.eval.spliced_split)
    section.num_tokens = int(config.eval.spliced_tokens)
    section.seed = int(section.seed) + 1
    contexts = tokens.contexts_for(section, tokens.load_tokenizer(dirs[run.snapshots[0]]))
    console.say("spliced", f"spliced-in loss over {int(contexts.valid.sum())} tokens of {len(contexts.input_ids)} "
                "contexts")
    return spliced_loss(dirs, run.export_dir, config.model.hook, contexts)
