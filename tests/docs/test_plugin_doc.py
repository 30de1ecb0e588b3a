"""docs/plugins.md shows the example plugin's files verbatim: they cannot drift apart.

The doc's shell blocks install and run that same package (tests/docs/test_doc_commands.py,
slow); tests/plugins/ tests it in depth.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "tests" / "plugins" / "gptqflow-normscale"


def _block(text: str, language: str) -> str:
    found = re.findall(rf"^(`{{3,}}){language}\n(.*?)^\1$", text, re.S | re.M)
    assert len(found) == 1, f"expected one ```{language} block, found {len(found)}"
    return str(found[0][1])


def test_plugin_doc_shows_the_package_files() -> None:
    doc = (REPO / "docs" / "plugins.md").read_text()
    assert _block(doc, "toml") == (PACKAGE / "pyproject.toml").read_text()
    module = PACKAGE / "src" / "gptqflow_normscale" / "__init__.py"
    assert _block(doc, "python") == module.read_text()
