"""Generates the events' JSON Schema files under proto/schemas from the pydantic models.

`python -m services.common.schemas proto/schemas` (or `make schemas`) rewrites them;
a test fails when the committed files drift from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services.common.events import EVENT_MODELS


def render_schemas() -> dict[str, str]:
    """File name -> JSON text of each event's schema."""
    return {
        f"{name}.v1.schema.json": json.dumps(
            model.model_json_schema(), indent=2, sort_keys=True
        )
        + "\n"
        for name, model in EVENT_MODELS.items()
    }


def main(folder: str) -> None:
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for name, text in render_schemas().items():
        (target / name).write_text(text)
        print(f"wrote {target / name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "proto/schemas")
