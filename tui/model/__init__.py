"""The console's parts that hold no widget: models, parsing and text.

Nothing here imports Textual or Rich (a test proves it), so each part is
tested, and could be reused, without a terminal.
"""
