"""The README's "Testing your integration" example works as written: copied into a fresh
project directory, run by pytest there, with the plugin found through its entry point."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def test_readme_integration_example_passes_as_written(tmp_path: Path) -> None:
    section = _section(README.read_text(encoding="utf-8"), "## Testing your integration")
    [scenario] = _blocks(section, "yaml")[:1]
    pytest_part = _section(section, "### pytest")
    [example] = _blocks(pytest_part, "python")[:1]
    # the example refers to the scenario file by this path
    assert "tests/scenarios/fire-lane.yaml" in example
    (tmp_path / "tests" / "scenarios").mkdir(parents=True)
    (tmp_path / "tests" / "scenarios" / "fire-lane.yaml").write_text(scenario, encoding="utf-8")
    (tmp_path / "test_integration.py").write_text(example, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_integration.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b4 passed\b", result.stdout), result.stdout[-2000:]
