#!/usr/bin/env bash
# Build Helm (Apache-2.0), which renders and lints the Kubernetes chart in helm/handtrace, from the
# Go module proxy, and cache the binary. Prints the binary's path.
# First run ~6 min on 2 cores; afterwards instant. Used by deploy/setup.sh (when Go is present)
# and by tests/unit/test_helm_chart.py (which fails loudly if the binary is missing).
set -euo pipefail
VERSION="${HANDTRACE_HELM_VERSION:-v3.22.0}"
exec "$(dirname "${BASH_SOURCE[0]}")/gobuild.sh" helm "helm.sh/helm/v3" "$VERSION" ./cmd/helm \
  "-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION"
