#!/bin/sh
# /usr/bin/handtrace-agent (the .deb): Debian's python3 running the agent's own libraries under
# /opt/handtrace-agent/lib, isolated from the user's site-packages and PYTHON* variables.
# Settings: /etc/handtrace/agent.env (IT, via device management), then the employee's
# ~/.config/handtrace/agent.env (e.g. the employee id); docs/agent-rollout.md.
set -e
home="${HANDTRACE_AGENT_HOME:-/opt/handtrace-agent}"
for f in "${HANDTRACE_AGENT_ENV_FILE:-/etc/handtrace/agent.env}" "${XDG_CONFIG_HOME:-$HOME/.config}/handtrace/agent.env"; do
  if [ -r "$f" ]; then set -a; . "$f"; set +a; fi
done
# One state dir per user whatever the working directory (the systemd unit sets the same: %S).
: "${HANDTRACE_STATE_DIR:=${XDG_STATE_HOME:-$HOME/.local/state}/handtrace}"
export HANDTRACE_STATE_DIR
# The packaged agent never captures before the employee's consent step (handtrace-agent consent).
export HANDTRACE_AGENT__REQUIRE_CONSENT=true
# The package's systemd user unit exists: `consent` starts it, `consent --withdraw` stops it.
: "${HANDTRACE_AGENT_SYSTEMD:=1}"
export HANDTRACE_AGENT_SYSTEMD
# -B: never writes bytecode under /opt (the package ships it for what the agent imports), so
# removal leaves nothing there even after root ran a command.
exec "${HANDTRACE_AGENT_PYTHON:-/usr/bin/python3}" -I -B "$home/handtrace-agent.py" "$@"
