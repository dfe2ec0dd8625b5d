"""User-facing errors. The CLI prints their message on one line, with no traceback."""


def first_line(e: BaseException) -> str:
    """An exception as "Type: first line of its message", for a one-line warning or report."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class TinyTitanError(Exception):
    """A user-facing error: the CLI prints its message on one line, no traceback."""


class ModelLoadError(TinyTitanError):
    """A checkpoint could not be read: missing, truncated, hostile or of an unsupported architecture."""


class TokenizerError(TinyTitanError):
    """A tokenizer could not be built from the metadata, or a chat template is missing or broken."""


class ContextLengthError(TinyTitanError):
    """A prompt (plus the tokens to generate) does not fit in the model's context."""


class UnknownModelError(TinyTitanError):
    """A model name that is neither a known zoo name nor an existing path."""


class TaskError(TinyTitanError):
    """An evaluation task that is unknown, or whose spec or options are invalid."""


class DataError(TinyTitanError):
    """An evaluation data file that is missing or malformed (the message names the file and line)."""
