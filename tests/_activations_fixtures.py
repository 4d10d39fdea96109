"""Tiny snapshots for the activation tests: a BPE tokenizer trained on a few sentences and random GPT-NeoX models
built with transformers (the PyTorch reference), saved as HF snapshot directories step0, step1, ..."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

WORDS = ("the cat sat on a mat while old dogs ran far into green fields and slept under quiet trees "
         "every morning birds sang songs about rain wind stone river light").split()
SPECIALS = ["<|endoftext|>", "<|padding|>"]  # ids 0 and 1, as in Pythia


def sentences(n: int, seed: int = 0) -> list[str]:
    """n documents of 1-4 sentences of random words: lengths vary so contexts get padding."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        parts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + "." for _ in range(rng.integers(1, 5))]
        docs.append(" ".join(parts).capitalize())
    return docs


def train_tokenizer(out_dir: Path, vocab_size: int = 320) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(200, seed=123), trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def hf_config(vocab_size: int, **overrides):
    from transformers import GPTNeoXConfig

    kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
              bos_token_id=0, eos_token_id=0, hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    return GPTNeoXConfig(**kw)


def save_snapshot(out_dir: Path, tokenizer_json: Path, seed: int, **config_overrides) -> Path:
    """A random GPTNeoXForCausalLM (weights drawn with a larger std so activations are not tiny) saved to out_dir."""
    import torch
    from transformers import GPTNeoXForCausalLM

    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(hf_config(len(vocab), **config_overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    shutil.copy(tokenizer_json, out_dir / "tokenizer.json")
    return out_dir


def make_snapshots(root: Path, names=("step0", "step1", "step2")) -> Path:
    """root/tok/tokenizer.json and root/<name>/ per snapshot (seed = its index); returns root."""
    tok = train_tokenizer(root / "tok")
    for i, name in enumerate(names):
        save_snapshot(root / name, tok, seed=i)
    return root


def write_jsonl(path: Path, docs, field: str = "text") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "id": len(d)}) + "\n")
    return path


def hf_hidden(snapshot_dir: Path, input_ids: np.ndarray, layer: int) -> np.ndarray:
    """The reference: transformers' hidden state after block `layer` (hidden_states[layer + 1]), [C, T, D]."""
    import torch
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(snapshot_dir).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(input_ids, dtype=torch.long), output_hidden_states=True)
    return out.hidden_states[layer + 1].numpy()


def make_config(root: Path, store_path: Path, **overrides):
    """The full crossjax config for generating activations of root/{step0,step1,step2} over root/docs.jsonl.

    overrides: dotted keys, e.g. {"tokens.seed": 1}."""
    from crossjax import configs

    c = configs.base_config()
    c.model.snapshots = ["step0", "step1", "step2"]
    c.model.path_template = str(root / "{snapshot}")
    c.model.hook = "blocks.1.hook_resid_post"
    c.tokens.source = "jsonl"
    c.tokens.path = str(root / "docs.jsonl")
    c.tokens.context_len = 24
    c.tokens.num_tokens = 300  # not a multiple of the block size: the last block is short
    c.store.path = str(store_path)
    c.store.block_rows = 32
    c.activations.shuffle_group_rows = 64  # 2 blocks per group: 5 groups
    c.activations.contexts_per_batch = 3
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def make_root(root: Path) -> Path:
    """Snapshots step0..step2 and a jsonl corpus of 60 documents under root."""
    make_snapshots(root)
    write_jsonl(root / "docs.jsonl", sentences(60, seed=5))
    return root


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under path (relative name -> bytes): two stores are identical iff these are equal."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}
