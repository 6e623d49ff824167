#!/usr/bin/env bash
# Set up a fresh machine for handtrace: system packages (when missing; Debian's chromium for the
# portal's browser tests among them), the virtualenv with pinned dependencies (constraints.txt),
# SeaweedFS for the S3 tests, helm for the chart's tests and nfpm for the agent's .deb (Go module
# proxy; need Go), and the Kafka broker jars (Maven Central).
# Idempotent and quiet when everything is already there. Used by `make setup` and .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# Tests drive real X11 input (Xvfb + xdotool) and scrape with a real Prometheus (+ promtool).
command -v Xvfb >/dev/null || need_apt+=(xvfb)
command -v xdotool >/dev/null || need_apt+=(xdotool)
# The agent's .deb: shared objects stripped (binutils), installed by dpkg in its test.
command -v strip >/dev/null || need_apt+=(binutils)
command -v promtool >/dev/null || need_apt+=(prometheus)
# Export scrubbing OCRs frames with tesseract; its tests draw text with a real TrueType font.
command -v tesseract >/dev/null || need_apt+=(tesseract-ocr)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
# The portal's browser tests drive Debian's Chromium through Playwright (tests/browser.py): the
# system package, never a browser Playwright downloads (issue #13). HANDTRACE_CHROMIUM overrides.
[ -x "${HANDTRACE_CHROMIUM:-/usr/bin/chromium}" ] || need_apt+=(chromium)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    echo "missing system packages: ${need_apt[*]} (install them, then re-run)" >&2
    exit 1
  fi
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  say "installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"handtrace needs Python >= 3.11, this is {sys.version.split()[0]}")
PY
java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
if [ "${java_major:-0}" -lt 17 ]; then
  echo "Kafka 4 needs Java 17+, found ${java_major:-none}" >&2
  exit 1
fi

stamp=.venv/.handtrace-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "creating .venv and installing pinned dependencies (constraints.txt)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  echo "$want" > "$stamp"
fi

# The frame-store tests run against a real S3 server, SeaweedFS, built from the Go module proxy
# (deploy/seaweedfs.sh; instant when cached, and then Go is not needed).
say "SeaweedFS for the S3 tests (deploy/seaweedfs.sh: built from the Go module proxy, ~7 min the first time, then cached)"
if ! weed=$(deploy/seaweedfs.sh); then
  if ! command -v go >/dev/null; then
    echo "Go is missing: install Go >= 1.21 (https://go.dev/dl; it fetches the newer toolchain" >&2
    echo "SeaweedFS asks for through the module proxy), then re-run" >&2
  fi
  echo "building SeaweedFS failed (see above)" >&2
  exit 1
fi
echo "    $weed"

# The Helm chart's tests (tests/unit/test_helm_chart.py) lint and render helm/handtrace with helm,
# built from the Go module proxy (deploy/helm.sh; instant when cached).
say "helm for the chart's tests (deploy/helm.sh: built from the Go module proxy, ~6 min the first time, then cached)"
if ! helm=$(deploy/helm.sh); then
  echo "building helm failed (see above; Go >= 1.21 is needed: https://go.dev/dl)" >&2
  exit 1
fi
echo "    $helm"
# The agent's .deb is packed by nfpm, built the same way (deploy/nfpm.sh; ~2 min the first time).
say "nfpm for the agent's .deb (deploy/nfpm.sh: built from the Go module proxy, then cached)"
if ! nfpm=$(deploy/nfpm.sh); then
  echo "building nfpm failed (see above)" >&2
  exit 1
fi
echo "    $nfpm"

say "provisioning the Kafka broker (cached after the first run)"
.venv/bin/python -m handtrace.core.localbroker provision >/dev/null
say "ready"
