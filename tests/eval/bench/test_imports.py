"""Importing any benchmark module runs nothing: no device touched, no program compiled, no file
written, nothing printed, no torch imported."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import loraswitch_jax.eval.bench as bench

MODULES = sorted(f"{bench.__name__}.{m.name}" for m in pkgutil.iter_modules(bench.__path__))

PROBE = """
import importlib, json, sys
from jax._src import xla_bridge
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"backends": sorted(xla_bridge._backends), "torch": "torch" in sys.modules}))
"""


def test_every_benchmark_module_is_listed():
    names = {m.rsplit(".", 1)[1] for m in MODULES}
    assert {"harness", "launches", "decode", "adapters", "kernels", "kernel_sweep", "profile",
            "peers"} <= names


def test_importing_runs_nothing(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, *MODULES], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *printed, last = proc.stdout.splitlines()
    assert printed == []
    assert json.loads(last) == {"backends": [], "torch": False}
    assert "Compiling" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
