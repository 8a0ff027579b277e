"""`make bench`: run every benchmark module in this package, one after the other."""

from __future__ import annotations

import pkgutil
import runpy
import sys
from pathlib import Path


def main(names: list[str]) -> int:
    available = sorted(
        module.name
        for module in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not module.name.startswith("_")
    )
    chosen = names or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        print(
            f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr
        )
        return 2
    for name in chosen:
        print(f"\n== bench.{name} ==", flush=True)
        runpy.run_module(f"bench.{name}", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
