"""The error every data source raises for input the user must fix: a missing set, a bad file, a bad layout."""

from __future__ import annotations

from pipeline.errors import UserInputError


class DataError(UserInputError):
    """The data cannot be loaded as configured; the message names the file or key and the fix."""
