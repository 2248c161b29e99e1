"""The library phyai installs stands alone: it imports nothing from the lab, and its wheel holds no lab.

The lab (``lab/phyai_cache_lab``: benchmark, reference models and weights, serving demo, test
fixtures) depends on the library, never the other way round (docs/architecture.md, "Library and lab").
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import phyai_cache

LIBRARY = Path(phyai_cache.__file__).parent
REPO = LIBRARY.parent
LAB_PACKAGE = "phyai_cache_lab"


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_no_library_module_imports_the_lab():
    offenders = {str(path.relative_to(REPO)): sorted(m for m in _imported_modules(path)
                                                     if m.split(".")[0] == LAB_PACKAGE)
                 for path in LIBRARY.rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_importing_every_library_module_loads_no_lab_module():
    modules = sorted(
        "phyai_cache." + ".".join(path.relative_to(LIBRARY).with_suffix("").parts).removesuffix(".__init__")
        for path in LIBRARY.rglob("*.py") if path.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name.removesuffix('.'))\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == {LAB_PACKAGE!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_library_wheel_holds_no_weights_benchmark_or_fixtures(tmp_path):
    """What ``pip install phyai-cache`` installs: the library's files, the presets, nothing of the lab."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            str(REPO), "-w", str(tmp_path)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"building the library wheel failed:\n{built.stderr[-2000:]}")
    (wheel,) = tmp_path.glob("phyai_cache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.startswith("phyai_cache-")}
    assert top_level == {"phyai_cache"}
    lab_like = [n for n in names if any(part in n for part in ("/bench/", "/reference/", "/testing/", "/serving/",
                                                                 "weights", ".safetensors", ".pt"))]
    assert lab_like == []
    assert any(name.startswith("phyai_cache/configs/") and name.endswith(".yaml") for name in names)
    assert "phyai_cache/tuning/tune.py" in names  # phyai_cache.tune stays in the library


def test_a_lab_command_without_the_lab_says_what_to_install(monkeypatch, capsys):
    from phyai_cache import cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])  # as on a machine with the library alone
    assert cli.main(["bench", "--quick"]) == 2
    assert "comes with the lab package" in capsys.readouterr().err
    assert cli.main(["presets"]) == 0  # the library's own commands still work
