"""``python -m dashboards [--check]``: write dashboards/<name>.json from definitions.py, or with
``--check`` exit 1 when a committed file differs from what the code generates."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dashboards.definitions import DASHBOARDS

HERE = Path(__file__).resolve().parent


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard (deterministic: sorted keys, trailing newline)."""
    return {f"{d.uid.removeprefix('handtrace-')}.json": json.dumps(d.to_json(), indent=2, sort_keys=True,
                                                                       ensure_ascii=False) + "\n"
            for d in DASHBOARDS}


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (HERE / n).exists() or (HERE / n).read_text() != text]
        extra = sorted(p.name for p in HERE.glob("*.json") if p.name not in files)
        for n in stale + extra:
            print(f"dashboards/{n} is out of date; run `python -m dashboards`", file=sys.stderr)
        return 1 if stale or extra else 0
    for n, text in files.items():
        (HERE / n).write_text(text, encoding="utf-8")
        print(f"wrote dashboards/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
