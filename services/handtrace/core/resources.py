"""Files the code reads at run time that live outside the Python package in the source tree
(issue #10, class 9): the broker's Maven pom, the example policy, the dashboards JSON, the Avro
schemas.

A built wheel carries copies of them inside the package (pyproject.toml,
``[tool.hatch.build.targets.wheel.force-include]``); :func:`data_file` and :func:`data_dir` find
the packaged copy with importlib.resources and fall back to the source tree only when running
from a checkout (editable install or PYTHONPATH=services). tests/integration/test_wheel.py builds
the wheel and resolves every one of them from outside the checkout.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path

PACKAGED = {"deploy": "_deploy", "dashboards": "_dashboards", "schemas": "_schemas"}
"""Top-level source directory -> the package directory its shipped files are copied to."""


def _checkout_root() -> Path:
    return Path(__file__).resolve().parents[3]


def _packaged(top: str, parts: tuple[str, ...]) -> Path | None:
    resource = files("handtrace").joinpath(PACKAGED[top], *parts)
    if not (resource.is_file() or resource.is_dir()):
        return None
    # A wheel installs as plain files, so as_file yields the real path (no temporary copy).
    with as_file(resource) as path:
        return Path(path)


def data_file(top: str, *parts: str) -> Path:
    """A shipped file, e.g. ``data_file("deploy", "kafka", "pom.xml")``: the packaged copy, else
    the checkout's. Raises FileNotFoundError naming both places when neither exists."""
    if top not in PACKAGED:
        raise ValueError(f"{top!r} is not shipped with the package (one of {sorted(PACKAGED)})")
    packaged = _packaged(top, parts)
    if packaged is not None and packaged.is_file():
        return packaged
    source = _checkout_root().joinpath(top, *parts)
    if source.is_file():
        return source
    raise FileNotFoundError(f"{'/'.join((top, *parts))} is neither packaged "
                            f"(handtrace/{PACKAGED[top]}) nor in a source checkout ({source})")


def data_dir(top: str, *parts: str) -> Path:
    """A shipped directory (``data_dir("dashboards")``): the packaged copy, else the checkout's
    (returned even when missing, so the caller's message names it)."""
    if top not in PACKAGED:
        raise ValueError(f"{top!r} is not shipped with the package (one of {sorted(PACKAGED)})")
    packaged = _packaged(top, parts)
    if packaged is not None and packaged.is_dir():
        return packaged
    return _checkout_root().joinpath(top, *parts)
