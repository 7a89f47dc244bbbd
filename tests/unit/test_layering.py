"""The import contracts of pyproject.toml cover every module, new ones included."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import image_service

ROOT = Path(__file__).resolve().parents[2]


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def test_the_protocol_contract_names_every_other_module_of_the_service() -> None:
    contract = next(c for c in _contracts() if "protocol package stands alone" in str(c["name"]))
    forbidden = set(contract["forbidden_modules"])  # type: ignore[call-overload]
    modules = {
        f"image_service.{m.name}"
        for m in pkgutil.iter_modules(image_service.__path__)
        if m.name != "protocol"
    }
    assert modules - forbidden == set(), "add new modules to the contract"
