"""The package's shape: import contracts (.importlinter), module and class sizes, and production code
that never reaches the test harnesses."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import jax_elastic_moe

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(jax_elastic_moe.__file__).resolve().parent
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300
# Classes allowed over the limit for now, with their own limit (none today). An entry fails once its
# class is back under the limit, so the list only shrinks.
GRANDFATHERED: dict[str, int] = {}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_over_500_lines_and_no_class_over_300():
    too_long = []
    for path in _modules():
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        lines = text.count("\n") + (not text.endswith("\n"))
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines (module limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                key = f"{name}::{node.name}"
                limit = GRANDFATHERED.get(key, MAX_CLASS_LINES)
                if size > limit:
                    too_long.append(f"{key}: {size} lines (class limit {limit})")
                elif key in GRANDFATHERED and size <= MAX_CLASS_LINES:
                    too_long.append(f"{key}: {size} lines, under the limit now: remove it from GRANDFATHERED")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_the_size_check_sees_the_package():
    assert len(_modules()) > 40 and any(p.name == "engine.py" for p in _modules())


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports not found: pip install -e '.[test]' (import-linter)")
    out = subprocess.run([lint, "--config", str(ROOT / ".importlinter"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout, out.stdout[-2000:]
