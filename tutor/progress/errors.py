"""The progress store's one error, shared by the modules that open, upgrade and query it."""


class StoreError(Exception):
    """The progress store cannot do what was asked; the message says why, for a human."""
