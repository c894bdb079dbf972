"""Errors of the data layer."""


class DataError(RuntimeError):
    """Bad input data. The message names the file, shard and key at fault."""
