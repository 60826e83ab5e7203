"""One base class for the errors edgellm raises on bad input: the CLI prints them without a trace."""


class EdgeLLMError(Exception):
    """Bad input or an unavailable resource; the message says what to do."""
