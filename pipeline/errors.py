"""The one error type stages report as a single clear line instead of a traceback."""


class PipelineError(Exception):
    """Bad input (params, data files, downloads) or a run that cannot go on; the message says which."""
