"""guestsafe's colour themes.

Every colour is one of the xterm 256-colour palette's own entries, so a plain
256-colour SSH terminal shows exactly these colours instead of approximations
that can collapse neighbouring shades into one.
"""

from __future__ import annotations

from textual.theme import Theme

DARK = Theme(
    name="guestsafe-dark",
    primary="#0087af",
    secondary="#005f87",
    accent="#ffaf00",
    warning="#ffaf00",
    error="#d75f5f",
    success="#5faf5f",
    foreground="#dadada",
    background="#1c1c1c",
    surface="#262626",
    panel="#303030",
    dark=True,
    variables={
        "footer-key-foreground": "#ffaf00",
        "block-cursor-text-style": "bold",
    },
)

LIGHT = Theme(
    name="guestsafe-light",
    primary="#005f87",
    secondary="#0087af",
    accent="#af5f00",
    warning="#af5f00",
    error="#af0000",
    success="#008700",
    foreground="#1c1c1c",
    background="#eeeeee",
    surface="#e4e4e4",
    panel="#d0d0d0",
    dark=False,
    variables={
        "footer-key-foreground": "#005f87",
        "block-cursor-text-style": "bold",
    },
)

# For low vision and washed-out projectors: pure black and white, bold cursor,
# and colours chosen for contrast rather than mood.
HIGH_CONTRAST = Theme(
    name="guestsafe-high-contrast",
    primary="#ffff00",
    secondary="#00ffff",
    accent="#ffff00",
    warning="#ffff00",
    error="#ff5f5f",
    success="#00ff00",
    foreground="#ffffff",
    background="#000000",
    surface="#000000",
    panel="#000000",
    dark=True,
    luminosity_spread=0.0,
    text_alpha=1.0,
    variables={
        "footer-key-foreground": "#ffff00",
        "block-cursor-foreground": "#000000",
        "block-cursor-background": "#ffff00",
        "block-cursor-text-style": "bold",
        "border": "#ffffff",
        "border-blurred": "#bcbcbc",
        "input-selection-background": "#0000ff",
        "button-color-foreground": "#000000",
    },
)

THEMES: tuple[Theme, ...] = (DARK, LIGHT, HIGH_CONTRAST)
