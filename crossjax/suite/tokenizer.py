"""A byte-level BPE tokenizer for the offline suite, trained on the corpus's train split.

Special tokens follow Pythia's tokenizer: id 0 is `<|endoftext|>` (used as BOS and EOS, and as the document
separator when pre-training), id 1 is `<|padding|>`. Nothing is added automatically at encode time (no
post-processor), again like Pythia: the code that builds contexts prepends BOS itself.

The directory written holds tokenizer.json (read by `crossjax.tokens`, like every snapshot's tokenizer) plus
tokenizer_config.json and special_tokens_map.json so that `transformers.AutoTokenizer.from_pretrained(dir)` loads it.
Training is deterministic: the same documents and vocab size give byte-identical files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from crossjax.errors import CrossjaxError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
EOS_ID = 0
PAD_ID = 1
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1, in this order
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte must be representable

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_tokenizer(documents: Sequence[str], vocab_size: int = 4096, *, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with exactly `vocab_size` entries (fewer only if the text runs out of merges)."""
    if vocab_size < MIN_VOCAB:
        raise CrossjaxError(f"suite.vocab_size={vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB}.")
    if not documents:
        raise CrossjaxError("Cannot train a tokenizer on zero documents: check the corpus split.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(documents), trainer=trainer, length=len(documents))
    for tid, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == tid, (name, tok.token_to_id(name))
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, *, model_max_length: int) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        # The generic fast tokenizer loads tokenizer.json exactly as written (model-specific classes may rebuild it).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(model_max_length),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


def build_tokenizer(documents: Sequence[str], out_dir: str | os.PathLike, *, vocab_size: int,
                    model_max_length: int) -> Tokenizer:
    """Train on `documents` and save to out_dir; returns the tokenizer."""
    tok = train_tokenizer(documents, vocab_size)
    save_tokenizer(tok, out_dir, model_max_length=model_max_length)
    return tok
