"""``python -m agent.daemon``: agentd (the installed command is ``agentd``)."""

import sys

from agent.daemon.main import main

sys.exit(main())
