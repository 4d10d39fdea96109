"""One of several processes tokenizing a streamed dataset through one token cache (no jax: tokens only).

usage: python tests/data/_tokens_process.py DATA_DIR CACHE_DIR PROCESS_INDEX PROCESS_COUNT OUT.json
Writes the contexts' fingerprint and the units this process read. The settings mirror
tests/data/test_hf_stream.py (section(), WINDOW, the int tokenizer).
"""

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
sys.path.insert(0, os.path.dirname(__file__))

from test_hf_stream import INFO, WINDOW, section  # noqa: E402

from crossjax import document_stream, tokens  # noqa: E402

data, cache, pi, pc, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
document_stream.STREAM_WINDOW_DOCS = WINDOW
read_units = []
read = document_stream.StreamUnits.read
document_stream.StreamUnits.read = lambda self, unit, start=0: read_units.append(unit) or read(self, unit, start)
c = tokens.contexts_for(section(data, num_tokens=700), INFO, cache_dir=cache, process_index=pi, process_count=pc,
                        wait_s=120)
with open(out, "w") as fh:
    json.dump(dict(fingerprint=c.fingerprint(), units=read_units), fh)
