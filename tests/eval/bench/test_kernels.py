"""The GPU kernel check program, run small in interpret mode: every kernel agrees with its
reference and the report is written."""

from __future__ import annotations

import json

import pytest

from loraswitch_jax.eval.bench import kernels


def test_small_interpret_run(tmp_path):
    """One kernel of each family (tests/pallas checks every kernel in depth)."""
    only = ["switch_merge", "routed_gate_up_matmul M=64", "decode_attention B=8",
            "routed_qkv_matmul M=1 E=8", "lora_shrink_group q,k,v M=8"]
    report = kernels.main(kernels.parse_args(["--small", "--interpret", "--reps", "1",
                                              "--out", str(tmp_path), "--only", *only]))
    names = [row["kernel"] for row in report["rows"]]
    for text in only:
        assert any(text in n for n in names), text
    assert "routed_qkv_matmul M=1 E=8 expand=rows" in names  # gather slots at M 1
    assert "routed_gate_up_matmul +down shrink M=64 E=8" not in names  # not named by --only
    assert all(row["ok"] for row in report["rows"])
    saved = json.loads((tmp_path / "check_small.json").read_text())
    assert saved["rows"] == report["rows"]
    assert "| routed_qkv_matmul M=1 E=8 |" in (tmp_path / "check_small.md").read_text()


def test_only_and_a_failing_kernel_keeps_the_rest(tmp_path, monkeypatch):
    """``--only`` picks kernels by name; a kernel that raises is recorded and the run goes on,
    ending with an error, and the report on disk holds every row."""
    real = kernels.check

    def check(name, *args, **kwargs):
        if name == "decode_attention B=1":
            raise RuntimeError("Shared memory size limit exceeded | requested 245760\nmore")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(kernels, "check", check)
    with pytest.raises(SystemExit, match="differ"):
        kernels.main(kernels.parse_args(["--small", "--interpret", "--reps", "1", "--only",
                                         "decode_attention", "--out", str(tmp_path)]))
    rows = json.loads((tmp_path / "check_small.json").read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["decode_attention B=1", "decode_attention B=8"]
    assert "Shared memory" in rows[0]["error"] and rows[1]["ok"]
    table = (tmp_path / "check_small.md").read_text()  # one line per kernel, | escaped
    assert "exceeded \\| requested 245760 |" in table and "more" not in table


def test_config_refuses_bad_input():
    with pytest.raises(ValueError, match="reps"):
        kernels.KernelsConfig(reps=0)
