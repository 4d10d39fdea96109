"""The two phases of pre-training (model snapshots, eval.phases_tokens > 0; crossjax/analysis/phases.py): per
snapshot, the LM's loss and its KL to the corpus unigram and bigram statistics over eval.phases_tokens held-out
tokens (tokens.split = eval.spliced_split), the statistics counted over eval.phases_stats_tokens tokens of the
training split, and the snapshot where the statistical phase gives way (the transition rule).

Returns {"curves": {snapshot: {loss, kl_unigram, kl_bigram, pairs}}, "transition": {...}, "stats_tokens": n}.
"""
from __future__ import annotations

import copy

from crossjax import console


def evaluate(run) -> dict | None:
    config = run.config
    # a sequence of snapshots is what has phases (a per-snapshot SAE of crossjax.compare has one)
    if config.data.source != "snapshots" or int(config.eval.phases_tokens) <= 0 or len(run.snapshots) < 2:
        return None
    import jax
    if jax.process_index() != 0:
        return None
    from crossjax import activations, tokens
    from crossjax.analysis import phases
    dirs = activations.snapshot_dirs(config.model, run.snapshots)
    tokenizer = tokens.load_tokenizer(dirs[run.snapshots[0]])

    def contexts(split: str, num_tokens: int, seed_offset: int):
        section = copy.deepcopy(config.tokens)
        section.split, section.num_tokens = split, int(num_tokens)
        section.seed = int(section.seed) + seed_offset
        c = tokens.contexts_for(section, tokenizer)
        return c.input_ids, tokens.prefix_mask(c.valid)     # the attention mask the spliced-in loss takes

    train_ids, train_mask = contexts("train", config.eval.phases_stats_tokens, 2)
    stats = phases.ngram_statistics(train_ids, train_mask, tokenizer.vocab_size)
    held = contexts(str(config.eval.spliced_split), config.eval.phases_tokens, 3)
    console.say("phases", f"loss and KL to the unigram/bigram statistics of {int(train_mask.sum())} training "
                f"tokens, over {int(held[1].sum())} held-out tokens, for {len(dirs)} snapshots")
    curves = phases.phase_curves(dirs, held, stats)
    return {"curves": curves, "transition": phases.transition(curves), "stats_tokens": int(train_mask.sum())}
