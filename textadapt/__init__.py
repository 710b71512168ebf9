"""textadapt: adapt CLIP to a new dataset from text alone.

The library is a set of stage functions (see ``textadapt.pipeline``); the Prefect flow in
``flows/`` wraps them as tasks, and ``textadapt.cli`` is a thin command line over both.
"""

__version__ = "0.1.0"


class TextadaptError(Exception):
    """An error a user can act on: the message names the file, field or value and the way out."""
