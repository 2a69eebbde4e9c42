"""The one exception type that means "the user asked for something we cannot do".

The CLI prints such an error as one line on stderr and exits non-zero, without a
traceback; anything else that escapes is a bug and keeps its traceback.
"""


class GenfastError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class GenfastWarning(UserWarning):
    """Something the user should know that does not stop the work (a prompt cut short);
    the CLI prints it as one line."""


class EngineUnavailable(GenfastError):
    """An engine that cannot run here (no CUDA, a runtime not installed, a model it does
    not fit); `genfast bench` turns it into a skipped row instead of stopping."""
