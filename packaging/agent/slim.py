"""Trim the agent's installed libraries (deploy/agent-deb.sh runs this on the staged lib dir).

    python packaging/agent/slim.py LIB_DIR

1. Removes what the agent never loads: pygments (rich's syntax highlighter, used only for code
   blocks and rich tracebacks; the agent's CLI turns rich tracebacks off), Pillow's AVIF codec,
   type stubs and C sources shipped inside wheels.
2. Byte-compiles (hash-checked, so mtimes do not matter) exactly the modules the agent imports --
   its entry point, the capture backends, screenshots and demonstrations -- and leaves the rest
   as source: a module never imported costs no .pyc. The list is found by importing them here,
   with this directory alone on the path (``-I -S``), which also proves they import.

Shared objects are stripped by the shell script (``strip --strip-unneeded``, what dh_strip does).
"""

from __future__ import annotations

import compileall
import importlib
import py_compile
import shutil
import sys
from pathlib import Path

PRUNE_DIRS = ["pygments"]
# Pillow's AVIF codec (5 MB): the agent encodes WebP or JPEG; Pillow treats AVIF as unsupported
# when the module is missing (AvifImagePlugin catches the ImportError).
PRUNE_GLOBS = ["PIL/_avif.*.so", "pillow.libs/libavif-*"]
PRUNE_SUFFIXES = (".pyi", ".pxd", ".pyx", ".c", ".h")
# Imported when the agent runs (some lazily: x11 backend, screenshots, frames, signing, WebP).
AGENT_MODULES = [
    "handtrace.agent.cli", "handtrace.agent.commands", "handtrace.agent.runcmd", "handtrace.agent.service",
    "handtrace.agent.consent", "handtrace.agent.screenshots",
    "handtrace.agent.frames", "handtrace.agent.actions", "handtrace.agent.sources", "handtrace.agent.sources.x11",
    "handtrace.agent.localsock", "handtrace.core.resources", "PIL.Image", "PIL.WebPImagePlugin",
    "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "mss", "Xlib.display", "Xlib.ext.record", "Xlib.ext.xtest",
    "cryptography.hazmat.primitives.asymmetric.ed25519", "confluent_kafka", "psutil",
]
# Imported only with a display (pynput picks its backend at import): compiled whole.
WHOLE_PACKAGES = ["pynput"]


def main(lib: Path) -> None:
    for name in PRUNE_DIRS:
        shutil.rmtree(lib / name, ignore_errors=True)
        for info in lib.glob(f"{name}-*.dist-info"):
            shutil.rmtree(info)
    for pattern in PRUNE_GLOBS:
        for p in lib.glob(pattern):
            p.unlink()
    for p in list(lib.rglob("*")):
        if p.is_file() and p.suffix in PRUNE_SUFFIXES:
            p.unlink()
    for cache in list(lib.rglob("__pycache__")):
        shutil.rmtree(cache)
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(lib))
    for m in AGENT_MODULES:
        importlib.import_module(m)
    files = {Path(f) for mod in list(sys.modules.values())
             if (f := getattr(mod, "__file__", None)) and f.endswith(".py") and Path(f).is_relative_to(lib)}
    for f in sorted(files):
        py_compile.compile(str(f), dfile=str(Path("/opt/handtrace-agent/lib") / f.relative_to(lib)), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    for pkg in WHOLE_PACKAGES:
        compileall.compile_dir(str(lib / pkg), quiet=1, ddir=f"/opt/handtrace-agent/lib/{pkg}",
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    print(f"slim: {len(files)} modules byte-compiled, pruned {', '.join(PRUNE_DIRS + PRUNE_GLOBS)}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
