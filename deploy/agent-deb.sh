#!/usr/bin/env bash
# Build the agent's .deb: the slim `handtrace-agent` wheel (packaging/agent) and its dependencies
# installed for this Python into /opt/handtrace-agent/lib (byte-compiled, so nothing is written
# there at run time), the launcher, the systemd user unit and the maintainer scripts, packed by
# nfpm (deploy/nfpm.sh). Prints the .deb's path.
#
#   deploy/agent-deb.sh [OUT_DIR]        (default dist/)
#
# PYTHON (default .venv/bin/python) must be the minor version the laptops run (/usr/bin/python3;
# the wheels carry compiled extensions for it): Debian 12 -> 3.11. Dependencies come pinned from
# constraints.txt through pip (PyPI, or pip's cache).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-dist}"
PYTHON="${PYTHON:-.venv/bin/python}"
nfpm=$(deploy/nfpm.sh)
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$PYTHON" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')
version=$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("packaging/agent/pyproject.toml", "rb"))["project"]["version"])')
stage=$(mktemp -d "${TMPDIR:-/tmp}/handtrace-agent-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
echo "agent-deb: building the handtrace-agent wheel" >&2
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$stage/wheel" packaging/agent
lib="$stage/root/opt/handtrace-agent/lib"
echo "agent-deb: installing it and its pinned dependencies for Python $pyver into /opt/handtrace-agent/lib" >&2
"$PYTHON" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$lib" \
  -c constraints.txt "$stage"/wheel/handtrace_agent-*.whl
rm -rf "$lib/bin"  # console scripts for pip's own interpreter path: /usr/bin/handtrace-agent replaces them
# Debug symbols out of the shared objects (what dh_strip does for Debian's own packages).
find "$lib" -name '*.so*' -type f -exec strip --strip-unneeded {} +
# Prune what the agent never loads; byte-compile what it does (hash-checked .pyc owned by dpkg,
# so removal leaves none): packaging/agent/slim.py.
"$PYTHON" -I -S packaging/agent/slim.py "$lib"
install -D -m 0644 packaging/agent/handtrace-agent.py "$stage/root/opt/handtrace-agent/handtrace-agent.py"
install -D -m 0755 packaging/agent/handtrace-agent.sh "$stage/root/usr/bin/handtrace-agent"
install -D -m 0644 packaging/agent/handtrace-agent.service "$stage/root/usr/lib/systemd/user/handtrace-agent.service"
install -D -m 0644 packaging/agent/agent.env "$stage/root/etc/handtrace/agent.env"
install -D -m 0644 docs/agent-rollout.md "$stage/root/usr/share/doc/handtrace-agent/agent-rollout.md"
mkdir -p "$stage/root/scripts" "$out"
install -m 0755 packaging/agent/scripts/* "$stage/root/scripts/"
cp packaging/agent/nfpm.yaml "$stage/root/nfpm.yaml"
deb="$(cd "$out" && pwd)/handtrace-agent_${version}_amd64.deb"
echo "agent-deb: packing $deb (nfpm)" >&2
(cd "$stage/root" && HANDTRACE_AGENT_VERSION="$version" HANDTRACE_AGENT_PYTHON="$pyver" \
  HANDTRACE_AGENT_PYTHON_NEXT="$pynext" "$nfpm" package -f nfpm.yaml -p deb -t "$deb" >&2)
echo "$deb"
