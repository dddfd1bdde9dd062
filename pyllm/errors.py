"""Errors that reach the user as one clear line (the CLI prints str(err) and exits with err.exit_code)."""


class PyllmError(Exception):
    """Base class: anything pyllm reports to the user without a traceback."""

    exit_code = 1


class GGUFError(PyllmError):
    """The file is missing, not GGUF, truncated or inconsistent."""

    exit_code = 2


class UnsupportedError(PyllmError):
    """A valid file that pyllm cannot run: unknown architecture, quant type, tokenizer."""

    exit_code = 2


class ContextError(PyllmError):
    """The prompt (or conversation) does not fit in the context window."""


class TemplateError(PyllmError):
    """An unsafe or broken chat template (from the GGUF or --chat-template: bad input, like a bad file)."""

    exit_code = 2


class NumericError(PyllmError):
    """The model computed NaN or infinity: broken weights, or a computation that overflowed.  rows: which rows
    of `logits` (the step's output) are not finite, so a batch can fail those sequences and keep the others."""

    def __init__(self, message: str, rows=None, logits=None):
        super().__init__(message)
        self.rows, self.logits = rows, logits


class MemoryLimitError(PyllmError):
    """A buffer would not fit in the available memory (or --max-memory): refused before it is allocated."""


class SamplingError(PyllmError):
    """The sampler has no token left to choose (every candidate removed by penalties or constraints)."""
