class EdgeRuntimeError(RuntimeError):
    """A user-facing problem (bad model file, image or input array): one line naming the problem and the fix.

    `python -m runtime.infer` prints it to stderr and exits 2, without a traceback."""
