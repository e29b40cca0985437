"""guestsafe's front-ends: the Textual console and the headless CLI.

Importing this package must stay cheap: the CLI lives here too and loads
Textual only when the console opens.
"""
