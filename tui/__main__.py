"""``python -m guestsafe.tui`` runs the guestsafe command."""

import sys

from .cli import main

sys.exit(main())
