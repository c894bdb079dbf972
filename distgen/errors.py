"""Error types the command line catches, in a module that imports nothing heavy (every command loads it)."""


class EvalError(RuntimeError):
    """Evaluation cannot run as asked (bad file, bad reference, bad option)."""
