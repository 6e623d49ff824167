#!/usr/bin/env bash
# Build nfpm (MIT), the packager that turns packaging/agent/nfpm.yaml into the agent's .deb, from
# the Go module proxy, and cache the binary. Prints the binary's path.
# First run ~2 min on 2 cores; afterwards instant. Used by deploy/setup.sh (CI builds it there),
# by deploy/agent-deb.sh and by tests/integration/test_agent_deb.py (which fails loudly without it).
set -euo pipefail
VERSION="${HANDTRACE_NFPM_VERSION:-v2.45.2}"
exec "$(dirname "${BASH_SOURCE[0]}")/gobuild.sh" nfpm "github.com/goreleaser/nfpm/v2" "$VERSION" ./cmd/nfpm
