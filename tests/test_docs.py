"""What the README and docs promise, checked against the code and packaging they describe."""

from __future__ import annotations

import re

from tests.conftest import ROOT


def test_readme_states_the_python_version_pyproject_declares():
    declared = re.search(r'requires-python = ">=\s*([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"declares Python ≥ {declared}" in readme
    assert "Python ≥ 3.10" not in readme


def test_decisions_no_longer_call_libraries_in_use_unused():
    decisions = (ROOT / "docs" / "decisions.md").read_text(encoding="utf-8")
    assert "Not yet used" not in decisions


def test_tolerance_docstring_states_the_rule_validate_applies():
    from autoglm_build import validate
    from autoglm_build.config import Tolerance

    rule = "max|a - b| <= atol + rtol * max|b|"
    doc = " ".join(Tolerance.__doc__.split())
    assert rule in " ".join(validate.__doc__.split())
    assert rule in doc and "not element by element" in doc


def test_readme_engine_row_agrees_with_the_benchmark_section():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| TensorRT engines"))
    measured = re.search(r"Measured on an? [^(]*\([^)]*?`(configs/[\w.-]+\.yaml)`", readme)
    assert measured, "the Benchmarks section names the config its numbers were measured on"
    assert measured.group(1) in row and "benchmarked" in row and "not benchmarked" not in row
