"""`python -m services.supervisor` is the `switchboard` command."""

import sys

from services.supervisor.cli import main

sys.exit(main())
