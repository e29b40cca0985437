"""A checkbox whose state shows by its character, not only by its colour.

Textual's checkbox draws the same ``X`` ticked or not and tells them apart by
colour; in a monochrome terminal both look ticked. This one draws ``[x]`` or
``[ ]``.
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Checkbox

TICKED = "[x]"
UNTICKED = "[ ]"


class TickBox(Checkbox):
    @property
    def _button(self) -> Content:
        style = self.get_visual_style("toggle--button")
        return Content.styled(TICKED if self.value else UNTICKED, style)
