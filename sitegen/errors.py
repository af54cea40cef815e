"""The project's one error type: a message a user can act on, never a traceback."""
from __future__ import annotations


class SitegenError(Exception):
    """An error with a readable message naming the input and the fix.

    The CLI prints ``str(err)`` and exits with ``exit_code``; a traceback is shown only with ``--debug``.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):
        # Pickled with its hint (an error raised in a pass's worker process reaches the build whole).
        return type(self), (self.message, self.hint)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(SitegenError):
    """A bad config value; the message names the TOML key."""


class ModelLoadError(SitegenError):
    """A checkpoint or architecture that cannot be turned into a model."""


class ImageError(SitegenError):
    """An image folder with nothing usable in it, or an image that cannot be read."""


class LayerError(SitegenError):
    """A layer name or pattern that matches nothing in the model."""
