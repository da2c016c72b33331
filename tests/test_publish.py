"""What a Comfy Registry publish ships: the git-tracked files minus .comfyignore (the registry's
rule; pyproject's [tool.comfy] includes is empty). A user's ComfyUI gets the node pack, the example
workflows, the documented tools and the docs, never the tests, benchmarks or the toy model."""
import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")


def _git(*args) -> list[str]:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()


def shipped() -> set[str]:
    tracked = set(_git("ls-files"))
    ignored = set(_git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    return tracked - ignored


def test_pyproject_adds_nothing_past_comfyignore():
    import tomllib
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["includes"] == []


def test_publish_leaves_out_tests_benchmarks_and_the_toy_world():
    files = shipped()
    for top in ("tests/", "benchmarks/", "toyworld/", "scripts/", "requirements/", ".ci/"):
        assert not [f for f in files if f.startswith(top)], top
    size = sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file())
    assert size < 5 * 2**20, f"{size / 2**20:.1f} MB would ship"


def test_publish_ships_what_a_user_needs():
    files = shipped()
    for need in ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "LICENSE", "web/anchordiff.js",
                 "nodes/__init__.py", "anchordiff_core/__init__.py", "anchordiff_client/__main__.py",
                 "anchordiff_eval/__main__.py", "docs/icon.svg"):
        assert need in files, need
    assert any(f.startswith("workflows/") and f.endswith(".json") for f in files)


def test_shipped_python_imports_nothing_left_out():
    """No shipped module imports the test fixtures, the toy world or the benchmarks."""
    files = shipped()
    left_out = {"tests", "fixtures", "toyworld", "benchmarks", "scripts", "synthetic"}
    for f in sorted(f for f in files if f.endswith(".py")):
        tree = ast.parse((ROOT / f).read_text(), f)
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                assert name.split(".")[0] not in left_out, f"{f} imports {name}"


def test_shipped_workflows_need_no_toy_model():
    """The toy's loader node registers only where toyworld/weights ships, which a publish leaves out:
    a shipped template that used it would open with a missing node."""
    import json
    files = shipped()
    workflows = [f for f in files if f.startswith("workflows/") and f.endswith(".json")]
    assert workflows
    for f in workflows:
        assert "AnchorDiffToySD3" not in (ROOT / f).read_text(), f
    assert not [f for f in files if "anchordiff-00-toy" in f]
