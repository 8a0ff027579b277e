"""The adapter catalog finds complete adapter folders, by safe names only."""

from __future__ import annotations

import os
from pathlib import Path

from services.inference.adapters import AdapterCatalog


def write_adapter(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_adapter_written_after_start_is_found(tmp_path: Path) -> None:
    catalog = AdapterCatalog(tmp_path / "adapters")
    assert catalog.list_names() == []

    write_adapter(tmp_path / "adapters", "capitals-v2")

    assert catalog.list_names() == ["capitals-v2"]
    found = catalog.find("capitals-v2")
    assert found is not None
    assert found.path == tmp_path / "adapters" / "capitals-v2"


def test_folder_without_config_is_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "partial").mkdir()

    assert AdapterCatalog(tmp_path).find("partial") is None
    assert AdapterCatalog(tmp_path).list_names() == []


def test_names_that_leave_the_folder_are_refused(tmp_path: Path) -> None:
    write_adapter(tmp_path, "outside")
    catalog = AdapterCatalog(tmp_path / "adapters")
    (tmp_path / "adapters").mkdir()

    assert catalog.find("../outside") is None
    assert catalog.find("..") is None
    assert catalog.find("/etc") is None


def test_rewritten_adapter_gets_a_new_stamp(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path, "a")
    catalog = AdapterCatalog(tmp_path)
    before = catalog.find("a")

    weights = folder / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))

    assert catalog.find("a") != before
