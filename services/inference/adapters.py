"""The adapter catalog: LoRA adapter folders under `adapters_dir`, found on each call.

A folder `adapters_dir/<name>/` holding `adapter_config.json` (what peft's
`save_pretrained` writes) is the adapter `<name>`. Nothing is cached, so a folder
written while the server runs is servable on the next request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Names are path segments: no separators, no leading dot, so no `..` either.
ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter on disk and a stamp that changes when its files are rewritten."""

    name: str
    path: Path
    stamp_ns: int


class AdapterCatalog:
    """Looks adapters up by name in one folder."""

    def __init__(self, adapters_dir: Path) -> None:
        self.adapters_dir = adapters_dir

    def find(self, name: str) -> AdapterRef | None:
        """The adapter called `name`, or None when no complete folder has that name."""
        if not ADAPTER_NAME_PATTERN.match(name):
            return None
        path = self.adapters_dir / name
        config = path / ADAPTER_CONFIG_FILE
        if not config.is_file():
            return None
        stamps = [config.stat().st_mtime_ns]
        for weights in ADAPTER_WEIGHT_FILES:
            if (path / weights).is_file():
                stamps.append((path / weights).stat().st_mtime_ns)
        return AdapterRef(name=name, path=path, stamp_ns=max(stamps))

    def list_names(self) -> list[str]:
        """Names of every adapter folder, sorted; empty when the folder is missing."""
        if not self.adapters_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.adapters_dir.iterdir()
            if ADAPTER_NAME_PATTERN.match(entry.name)
            and (entry / ADAPTER_CONFIG_FILE).is_file()
        )

    def created_at(self, name: str) -> int:
        """When the adapter folder was written, as Unix seconds (0 when gone)."""
        try:
            return int((self.adapters_dir / name / ADAPTER_CONFIG_FILE).stat().st_mtime)
        except OSError:
            return 0
