"""Fixtures of the attribution tests."""
import json

import pytest

from _attribution_cases import RUN_HOOK as HOOK
from _attribution_cases import RUN_SNAPSHOTS as S
from _attribution_cases import WORDS, crosscoder, snapshots, write_lines
from crossjax import crosscoder_export
from crossjax import tokens
from crossjax.models import save_hf_snapshot
from crossjax.summary import RunSummary


@pytest.fixture
def word_tokenizer(tmp_path) -> tokens.TokenizerInfo:
    """A word-level tokenizer.json over WORDS (each word is one token; an unknown word reads as <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tok"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                              "pad_token": "<|padding|>"}))
    return tokens.load_tokenizer(path)


@pytest.fixture
def finished_run(tmp_path, word_tokenizer):
    """A workdir as a finished run leaves it: config.json (model section), summary.json, export/; snapshots on disk."""
    names = []
    for name, loaded in snapshots(S).items():
        save_hf_snapshot(loaded.model, loaded.config, tmp_path / "snaps" / name,
                         tokenizer_dir=tmp_path / "tok")
        names.append(name)
    workdir = tmp_path / "run"
    params, scales, cfg = crosscoder(S)
    crosscoder_export.export_params(params, scales, cfg, str(workdir / "export"))
    model = {"snapshots": names, "path_template": str(tmp_path / "snaps" / "{snapshot}"), "repo": "", "hook": HOOK,
             "cache_dir": ""}
    (workdir / "config.json").write_text(json.dumps({"model": model}))
    RunSummary(workdir=str(workdir), store="memory://x", steps=1, tokens=1, snapshots=names,
               num_features=cfg.num_features, init_norm=1.0, scales=scales.tolist(), export=str(workdir / "export"),
               evolution={}, evals={}).write()
    task = write_lines(tmp_path / "thou.jsonl", [
        {"clean": "he said thou", "corrupted": "he said ye", "right": " art", "wrong": " are"},
        {"clean": "he said ye", "corrupted": "he said thou", "right": " are", "wrong": " art"},
        {"clean": "Behold , thou", "corrupted": "Behold , ye", "right": " hast", "wrong": " have"}])
    return workdir, task
