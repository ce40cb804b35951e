"""Errors for bad input: each names the file (or plate) and the problem, so a user can fix it."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a file or plate that cannot be used as it is."""

    def __init__(self, where: str | Path, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # Errors cross process-pool boundaries: rebuild them from both fields, not from args.
        return (type(self), (self.where, self.problem))


class ImageReadError(InputError):
    """An image file that is missing, unreadable, corrupt or of an unsupported kind."""


class PlateError(InputError):
    """A plate folder or manifest that breaks the plate format."""
