"""The floor pins come from pyproject.toml: every runtime dependency has a floor, and that floor is pinned."""

from __future__ import annotations

import tomllib

import pytest

from tests.floors.constraints import PYPROJECT, floor_of, floor_pins, python_floor


def test_floor_of_reads_the_lower_bound():
    assert floor_of("torch>=2.4") == ("torch", "2.4")
    assert floor_of("safetensors >= 0.6.1, <1") == ("safetensors", "0.6.1")
    assert floor_of("lycoris-lora==4.1.3") == ("lycoris-lora", "4.1.3")
    assert floor_of("Pillow[extra]>=10") == ("pillow", "10")


def test_a_dependency_without_floor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'tqdm' has no floor.*tqdm>=X"):
        floor_of("tqdm")
    with pytest.raises(ValueError, match="no floor"):
        floor_of("numpy<3")


def test_every_runtime_dependency_is_pinned_at_its_floor():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = floor_pins(project, ["pytest"])
    names = {floor_of(r)[0] for r in project["dependencies"]}
    assert names | {"pytest"} == set(pins)
    assert pins["torch"] == floor_of(next(r for r in project["dependencies"] if r.startswith("torch")))[1]
    # tomllib (the config loader, the web UI) is 3.11+: a lower requires-python would be false again
    assert tuple(map(int, python_floor(project).split("."))) >= (3, 11)


def test_a_test_tool_outside_the_test_extra_is_refused():
    project = {"dependencies": ["torch>=2.4"], "optional-dependencies": {"test": ["pytest>=8"]}}
    with pytest.raises(ValueError, match=r"\['hypothesis'\] not in the test extra"):
        floor_pins(project, ["hypothesis"])
