"""The layering table of docs/architecture.md, checked."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("ray", "celery", "sqlalchemy", "alembic", "vllm", "fastapi", "boto3")


VLLM_BACKEND = ROOT / "ndif" / "models" / "vllm"


def _imports(folder: Path, skip: Path | None = None) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        if skip is not None and path.is_relative_to(skip):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_ndif_imports_no_service_or_server_package():
    forbidden = {"ndif_scheduler", "ndif_workers", *SERVER_ONLY}
    assert not (_imports(ROOT / "ndif", skip=VLLM_BACKEND) & forbidden)


def test_only_the_vllm_backend_imports_vllm_and_nothing_else_of_the_server():
    forbidden = {"ndif_scheduler", "ndif_workers", *SERVER_ONLY} - {"vllm"}
    assert "vllm" in _imports(VLLM_BACKEND)
    assert not (_imports(VLLM_BACKEND) & forbidden)


def test_sdk_imports_neither_scheduler_nor_workers():
    assert not (_imports(ROOT / "sdk") & {"ndif_scheduler", "ndif_workers", *SERVER_ONLY})


def test_importing_ndif_loads_no_server_package():
    code = "import sys, ndif, ndif_sdk.cli; print(','.join(sorted(m for m in sys.modules if '.' not in m)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .split(",")
    )
    assert not (loaded & set(SERVER_ONLY))


def test_researcher_install_declares_light_dependencies_only():
    for project in (ROOT / "pyproject.toml", ROOT / "sdk" / "pyproject.toml"):
        dependencies = tomllib.loads(project.read_text())["project"]["dependencies"]
        names = {dependency.split(">")[0].split("=")[0].split("<")[0].strip().lower() for dependency in dependencies}
        assert not (names & set(SERVER_ONLY)), project


def _module_imports(folder: Path) -> set[str]:
    """Dotted module names imported under ``folder`` (absolute imports only)."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


def test_scheduler_imports_neither_vllm_nor_the_workers():
    imports = _module_imports(ROOT / "scheduler")
    assert not {name for name in imports if name.split(".")[0] in ("vllm", "ndif_workers", "ndif_sdk")}


def test_workers_use_only_the_schedulers_settings_storage_and_registry():
    used = {name for name in _module_imports(ROOT / "workers") if name.startswith("ndif_scheduler")}
    assert used <= {"ndif_scheduler.config", "ndif_scheduler.storage", "ndif_scheduler.registry"}, used


def test_published_openapi_spec_is_current():
    from ndif_scheduler.cli import openapi_spec

    published = (ROOT / "docs" / "openapi.json").read_text()
    assert published == openapi_spec() + "\n", "regenerate with: ndif-server openapi --out docs/openapi.json"
