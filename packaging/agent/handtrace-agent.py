# The .deb's entry point (run by /usr/bin/handtrace-agent with python3 -I -B): the agent's libraries
# live next to this file, in lib/.
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
sys.argv[0] = "handtrace-agent"

from handtrace.agent.cli import main  # noqa: E402

main()
