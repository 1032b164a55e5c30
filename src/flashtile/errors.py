"""Exception types shared by every layer."""


class UnsupportedError(NotImplementedError, ValueError):
    """A valid request flashtile cannot serve yet (both NotImplementedError and ValueError)."""
