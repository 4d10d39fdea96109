"""Config file for the activation command in tests: --config=tests/_activations_config.py:<root>:<store>."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _activations_fixtures as fx  # noqa: E402


def get_config(arg: str):
    root, store = arg.split(":")
    return fx.make_config(Path(root), Path(store))
