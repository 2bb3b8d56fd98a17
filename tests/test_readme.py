"""Every ```python block of README.md runs as written: the blocks of one section in order, in
one fresh namespace, in a temporary working folder (tiny demo models only, no downloads)."""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks(text: str) -> dict[str, list[str]]:
    """The ```python blocks of each ``##`` section, in order, keyed by the section's title."""
    sections: dict[str, list[str]] = {}
    title = ""
    for part in re.split(r"^(## .*)$", text, flags=re.M):
        if part.startswith("## "):
            title = part[3:].strip()
            continue
        blocks = re.findall(r"^```python\n(.*?)^```$", part, flags=re.M | re.S)
        if blocks:
            sections[title] = blocks
    return sections


SECTIONS = python_blocks(open(README).read())


def test_the_readme_has_the_sections_we_run():
    assert {"Python API", "From Flax"} <= set(SECTIONS)
    assert len(SECTIONS["From Flax"]) == 3  # load/train/generate/save, restore, sharding


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_readme_section_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_{section}"}
    for i, block in enumerate(SECTIONS[section]):
        exec(compile(block, f"README.md [{section} #{i}]", "exec"), namespace)
    if section == "From Flax":  # what the blocks claim: training lowers the loss, bf16 backbone
        losses = namespace["losses"]
        assert losses[-1] < losses[0] - 0.3, losses
        assert str(namespace["model"].backbone.embed.get_value().dtype) == "bfloat16"
    if section == "Python API":
        assert namespace["logits"].shape == (1, 4, 259)
        assert os.path.isfile("merged_hf_dir/config.json") and os.path.isdir("peft_dir")
