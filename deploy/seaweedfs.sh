#!/usr/bin/env bash
# Build SeaweedFS (Apache-2.0), the real S3-compatible server the frame-store tests run against,
# from the Go module proxy, and cache the binary. Prints the binary's path.
# First run ~8 min on 2 cores; afterwards instant. Used by deploy/setup.sh (when Go is present)
# and by tests/integration (which fail loudly if the binary is missing).
set -euo pipefail
VERSION="${HANDTRACE_SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
CACHE="${HANDTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/handtrace}"
OUT="$CACHE/seaweedfs-$VERSION/weed"
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
command -v go >/dev/null || { echo "seaweedfs: Go is needed to build the S3 test server" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
echo "seaweedfs: downloading github.com/seaweedfs/seaweedfs@$VERSION (Go module proxy)" >&2
dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "github.com/seaweedfs/seaweedfs@$VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "seaweedfs: module download failed" >&2; exit 1; }
echo "seaweedfs: building weed (~8 min the first time; cached in $OUT)" >&2
tmp="$OUT.tmp.$$"
(cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$tmp" ./weed)
mv "$tmp" "$OUT"
echo "$OUT"
