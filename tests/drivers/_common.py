"""Helpers shared by the test drivers (imported as ``_common``: drivers run as scripts from this folder)."""


class Tee:
    """Iterator wrapper remembering the last raw batch the forward step took."""

    def __init__(self, iterator):
        self.iterator, self.last = iterator, None

    def __iter__(self):
        return self

    def __next__(self):
        self.last = next(self.iterator)
        return self.last
