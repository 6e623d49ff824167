#!/usr/bin/env bash
# Build one Go command from the Go module proxy and cache the binary; prints the binary's path.
# Usage: deploy/gobuild.sh NAME[:BINARY] MODULE VERSION PACKAGE [LDFLAGS]
#   NAME      the cache folder's prefix; BINARY the binary's name (default NAME):
#             $CACHE/NAME-VERSION/BINARY
#   MODULE    the Go module (e.g. helm.sh/helm/v3); VERSION its version
#   PACKAGE   the command's package inside the module (e.g. ./cmd/helm)
#   LDFLAGS   linker flags (default: -s -w)
# The wrappers deploy/seaweedfs.sh, deploy/helm.sh and deploy/nfpm.sh name what they build.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: deploy/gobuild.sh NAME[:BINARY] MODULE VERSION PACKAGE [LDFLAGS]" >&2; exit 2; }
name=${1%%:*} binary=${1#*:} module=$2 version=$3 package=$4 ldflags=${5:--s -w}
cache="${HANDTRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/handtrace}"
out="$cache/$name-$version/$binary"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
command -v go >/dev/null || { echo "$name: Go is needed to build $module (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
echo "$name: downloading $module@$version (Go module proxy)" >&2
dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "$module@$version" \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -n "$dir" ] && [ -d "$dir" ] || { echo "$name: module download failed" >&2; exit 1; }
echo "$name: building $package (cached in $out)" >&2
tmp="$out.tmp.$$"
(cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp" "$package")
mv "$tmp" "$out"
echo "$out"
