"""The one exception type that reaches users of graphfuse."""


class GraphfuseError(Exception):
    """A user-facing error: one line saying what is wrong and what to do."""
