"""One distribution, one import package, and the layering between the folders."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against the folder map)."""
    package = "loraplex." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module or "")
    return names


def modules_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder, forbidden", [
    ("server", ("loraplex.loadtest", "loadtest")),
    ("kernels", ("loraplex.server", "server", "loraplex.loadtest")),
])
def test_layering_between_folders(folder, forbidden):
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p)
                                                   if any(m == f or m.startswith(f + ".") for f in forbidden))
                 for p in modules_under(folder)}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_two_front_doors_never_import_each_other():
    http = imported_modules(ROOT / "server" / "http_api.py")
    grpc = imported_modules(ROOT / "server" / "grpc_api.py")
    assert "loraplex.server.grpc_api" not in http and "loraplex.server.http_api" not in grpc


def test_nothing_imports_the_folders_as_top_level_packages():
    offenders = [str(p.relative_to(ROOT)) for folder in ("server", "kernels", "loadtest", "tests")
                 for p in modules_under(folder)
                 if any(m.split(".")[0] in ("server", "kernels", "loadtest") for m in imported_modules(p)
                        if not m.startswith("loraplex."))]
    assert not offenders


def test_the_wheel_installs_only_loraplex(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("loraplex-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"loraplex"}
    assert "loraplex/server/training/presets/demo.json" in names
    assert "loraplex/server/grpc_gen/loraplex_pb2.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "loraplex = loraplex.server.cli:main" in text and "loraplex.kernels.vllm_plugin:register" in text
