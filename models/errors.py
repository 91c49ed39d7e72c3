class EdgeportError(Exception):
    """A user-facing problem: CLIs print it as one line and exit 2, without a traceback."""
