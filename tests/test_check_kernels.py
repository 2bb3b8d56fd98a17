"""The GPU kernel check program, run small in interpret mode: every kernel agrees with its
reference and the report is written."""

from __future__ import annotations

import json

from loraswitch_jax.eval import check_kernels


def test_small_interpret_run(tmp_path):
    report = check_kernels.main(["--small", "--interpret", "--reps", "1", "--out", str(tmp_path)])
    names = [row["kernel"] for row in report["rows"]]
    assert any(n.startswith("switch_merge") for n in names)
    assert any(n.startswith("routed_gate_up_matmul M=64") for n in names)
    assert all(row["ok"] for row in report["rows"])
    saved = json.loads((tmp_path / "check_kernels.json").read_text())
    assert saved["rows"] == report["rows"]
    assert "| routed_qkv_matmul M=1 E=8 |" in (tmp_path / "check_kernels.md").read_text()
