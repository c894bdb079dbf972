"""Errors of the data layer (defined with the others in :mod:`distgen.errors`)."""

from distgen.errors import DataError

__all__ = ["DataError"]
