"""Errors whose messages are written for the app's users."""


class InputError(ValueError):
    """A problem with the user's input. The message is written for the user and safe to show in a UI."""


class ModelLoadError(RuntimeError):
    """No usable weights were found; the message says where it looked and what to do."""
