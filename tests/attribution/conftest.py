"""Fixtures of the attribution tests."""
import json

import pytest

from _attribution_cases import WORDS
from crossjax import tokens


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
