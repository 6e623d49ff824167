#!/usr/bin/env bash
# Build SeaweedFS (Apache-2.0), the real S3-compatible server the frame-store tests run against,
# from the Go module proxy, and cache the binary. Prints the binary's path.
# First run ~8 min on 2 cores; afterwards instant. Used by deploy/setup.sh (when Go is present)
# and by tests/integration (which fail loudly if the binary is missing).
set -euo pipefail
VERSION="${HANDTRACE_SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
exec "$(dirname "${BASH_SOURCE[0]}")/gobuild.sh" seaweedfs:weed "github.com/seaweedfs/seaweedfs" "$VERSION" ./weed
