#!/usr/bin/env bash
# Build Helm (Apache-2.0), which renders and lints the Kubernetes chart in helm/handtrace, from the
# Go module proxy, and cache the binary. Prints the binary's path.
# First run ~6 min on 2 cores; afterwards instant. Used by deploy/setup.sh (when Go is present)
# and by tests/unit/test_helm_chart.py (which fails loudly if the binary is missing).
set -euo pipefail
VERSION="${HANDTRACE_HELM_VERSION:-v3.22.0}"
CACHE="${HANDTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/handtrace}"
OUT="$CACHE/helm-$VERSION/helm"
if [ -x "$OUT" ]; then echo "$OUT"; exit 0; fi
command -v go >/dev/null || { echo "helm: Go is needed to build helm (deploy/helm.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
echo "helm: downloading helm.sh/helm/v3@$VERSION (Go module proxy)" >&2
dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "helm.sh/helm/v3@$VERSION" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "helm: module download failed" >&2; exit 1; }
echo "helm: building helm (~6 min the first time; cached in $OUT)" >&2
tmp="$OUT.tmp.$$"
(cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION" -o "$tmp" ./cmd/helm)
mv "$tmp" "$OUT"
echo "$OUT"
