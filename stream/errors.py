"""Errors that reach the user as one clear line (the CLI prints them and exits 2)."""


class ClickscoreError(Exception):
    """Bad input from the user (argument, file, model): the message says what to fix."""
