"""Every error type the command line catches, in a module that imports nothing heavy.

``distgen.cli`` catches these around every command and prints ``distgen: error: <message>`` (exit 2), so
their messages start with what is at fault: a file, a shard and key, a config field or a flag.
"""

from distgen.config.core import ConfigError  # noqa: F401  (re-exported: one place to import errors from)


class DataError(RuntimeError):
    """Bad input data. The message names the file, shard and key at fault."""


class TrainingError(RuntimeError):
    """The run cannot go on (divergence, impossible engine combination, no checkpoint that loads)."""


class CheckpointError(TrainingError):
    """A checkpoint folder does not load (a missing or damaged file, named in the message)."""


class SampleError(RuntimeError):
    """Sampling or exporting cannot run as asked (bad option, bad output path, bad export folder)."""


class EvalError(RuntimeError):
    """Evaluation cannot run as asked (bad file, bad reference, bad option)."""


ERRORS = (ConfigError, DataError, TrainingError, SampleError, EvalError)
