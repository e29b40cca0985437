"""An Input whose cursor does not blink.

Over SSH a blinking cursor redraws twice a second for nothing, and it makes
screenshots differ from run to run.
"""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Input


class FieldInput(Input):
    cursor_blink = reactive(False, init=False)
