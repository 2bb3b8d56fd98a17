"""Small real-text samples bundled for the offline demo (no downloads at run time).

``python_stdlib.jsonl``: 174 top-level functions and classes (163 kB) from 18 modules of the
CPython 3.11.7 standard library (textwrap, heapq, bisect, functools, string, shlex, fractions,
statistics, json.encoder, json.decoder, colorsys, calendar, difflib, graphlib, operator, random,
reprlib, pprint), one per line as ``{"text": ..., "source": "Lib/<module>.py"}``; extracted with
``ast.get_source_segment`` (80 to 6000 characters each). License: PSF License, see
``LICENSE-PSF.txt`` beside it.

``mixture/``: a ~1.2 MB sample of the evaluation corpus (``loraswitch_jax.eval.accuracy.corpus``)
for the offline pipeline demo: five domains (code, docs, dictionary, literature, qa), each split into
``{domain}.train.jsonl`` / ``{domain}.heldout.jsonl``, multiple-choice items built from the
held-out units in ``tasks/``, the sources' license notices in ``LICENSES/`` and a ``manifest.json``
with package versions and sha256 hashes.
"""

from __future__ import annotations

import os

__all__ = ["sample_path"]


def sample_path(name: str) -> str:
    """The absolute path of a bundled sample file."""
    path = os.path.join(os.path.dirname(__file__), name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no bundled sample {name!r} in {os.path.dirname(__file__)}")
    return path
