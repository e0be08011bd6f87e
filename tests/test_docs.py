"""The docs that are generated or promised: the configuration reference is the settings' own
descriptions (regenerate it with `python -m models reference > docs/configuration.md`), and the README's
test command is the one CI runs."""

from __future__ import annotations

from conftest import ROOT
from models.reference import reference


def test_the_configuration_reference_is_generated_from_the_settings():
    assert (ROOT / "docs" / "configuration.md").read_text() == reference()


def test_the_readme_gives_the_test_command_that_ci_runs():
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "\nmake test " in (ROOT / "README.md").read_text()
