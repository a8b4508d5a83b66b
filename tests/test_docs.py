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
