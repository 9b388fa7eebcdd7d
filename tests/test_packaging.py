"""The built wheel: it installs, imports outside the source tree, and carries what it should."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in the installed copy, from a folder outside the source tree. It prints what the test checks.
CHECK_SCRIPT = r"""
import inspect, json, sys
import harma

def documented(obj):
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj):
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        return bool(own and own.strip())
    return True  # constants carry no runtime docstring

def names(module):
    return {
        name: {"exists": hasattr(module, name),
               "documented": hasattr(module, name) and documented(getattr(module, name))}
        for name in module.__all__
    }

import harma.integrations.peft as bridge

print(json.dumps({
    "file": harma.__file__,
    "version": harma.__version__,
    "module_doc": bool(harma.__doc__ and harma.__doc__.strip()),
    "all": names(harma),
    "peft_all": names(bridge),
    "loaded_from": sorted({m.__file__ for n, m in sys.modules.items()
                           if n == "harma" or n.startswith("harma.")}),
}))
"""


def _setuptools_usable() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    major = int(importlib.metadata.version("setuptools").split(".")[0])
    return major >= 64


def _build_wheel(source: Path, out: Path) -> Path:
    """Build a wheel of ``source`` into ``out`` with the current interpreter: ``python -m build``
    if installed, else ``pip wheel``; without build isolation where setuptools is installed, so
    no network is needed."""
    isolated = not _setuptools_usable()
    if importlib.util.find_spec("build") is not None:
        command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)]
        command += [] if isolated else ["--no-isolation"]
    else:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(source)]
        command += [] if isolated else ["--no-build-isolation"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"wheel build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    wheels = sorted(out.glob("harma-*.whl"))
    assert len(wheels) == 1, f"expected one harma wheel in {out}, found {wheels}"
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy holding only what the build needs, so the working tree (where other
    # work goes on) gets no build/ or egg-info folders.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("LICENSE", "LICENSE.txt", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "harma", source / "harma", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return _build_wheel(source, tmp_path_factory.mktemp("dist"))


@pytest.mark.slow
def test_wheel_carries_the_package_its_type_marker_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
    assert "harma/py.typed" in files
    assert "harma/__init__.py" in files
    assert "harma/integrations/__init__.py" in files and "harma/integrations/peft.py" in files
    source_modules = {
        path.relative_to(ROOT).as_posix() for path in (ROOT / "harma").rglob("*.py") if "__pycache__" not in path.parts
    }
    assert source_modules <= set(files), f"modules missing from the wheel: {sorted(source_modules - set(files))}"
    others = {name.split("/")[0] for name in files} - {"harma"}
    assert len(others) == 1 and next(iter(others)).endswith(".dist-info"), f"unexpected top-level entries: {others}"


@pytest.mark.slow
def test_installed_wheel_imports_outside_the_source_tree_with_documented_public_names(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    # The wheel's copy comes first on sys.path; the project's own editable install (a finder
    # appended to sys.meta_path) is only asked when the path has nothing.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHECK_SCRIPT], cwd=workdir, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert Path(report["file"]).is_relative_to(target), report["file"]
    assert all(Path(path).is_relative_to(target) for path in report["loaded_from"]), report["loaded_from"]
    assert report["version"] == wheel.name.split("-")[1]  # the version setuptools read from pyproject.toml
    assert report["module_doc"]
    for section in ("all", "peft_all"):
        missing = [name for name, state in report[section].items() if not state["exists"]]
        undocumented = [name for name, state in report[section].items() if not state["documented"]]
        assert not missing, f"names in __all__ ({section}) that do not exist: {missing}"
        assert not undocumented, f"public names ({section}) without a docstring: {undocumented}"
