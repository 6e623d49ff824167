#!/usr/bin/env bash
# Build nfpm (MIT), the packager that turns packaging/agent/nfpm.yaml into the agent's .deb, from
# the Go module proxy, and cache the binary. Prints the binary's path.
# First run ~2 min on 2 cores; afterwards instant. Used by deploy/setup.sh (CI builds it there),
# by deploy/agent-deb.sh and by tests/integration/test_agent_deb.py (which fails loudly without it).
set -euo pipefail
VERSION="${HANDTRACE_NFPM_VERSION:-v2.45.2}"
CACHE="${HANDTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/handtrace}"
OUT="$CACHE/nfpm-$VERSION/nfpm"
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
command -v go >/dev/null || { echo "nfpm: Go is needed to build the .deb packager" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
echo "nfpm: downloading github.com/goreleaser/nfpm/v2@$VERSION (Go module proxy)" >&2
dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "github.com/goreleaser/nfpm/v2@$VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "nfpm: module download failed" >&2; exit 1; }
echo "nfpm: building nfpm (~2 min the first time; cached in $OUT)" >&2
tmp="$OUT.tmp.$$"
(cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$tmp" ./cmd/nfpm)
mv "$tmp" "$OUT"
echo "$OUT"
