"""A radio button whose choice shows by its character, not only by its colour.

Textual draws every radio button as the same dot and tells the pressed one by
colour alone; a monochrome terminal (or ``tmux capture-pane``) then shows both
choices alike. This one draws ``(•)`` for the chosen button and ``( )`` for
the others.
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import RadioButton

CHOSEN = "(•)"
NOT_CHOSEN = "( )"


class ChoiceButton(RadioButton):
    @property
    def _button(self) -> Content:
        style = self.get_visual_style("toggle--button")
        return Content.styled(CHOSEN if self.value else NOT_CHOSEN, style)
