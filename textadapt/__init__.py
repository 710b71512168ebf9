"""textadapt: adapt CLIP to a new dataset from text alone.

The library is a set of stage functions (see ``textadapt.pipeline``); the Prefect flow in
``textadapt.flows`` (the only part that imports Prefect) runs them, and ``textadapt.cli`` is a thin
command line over both.
"""

__version__ = "0.1.0"


class TextadaptError(Exception):
    """An error a user can act on: the message names the file, field or value and the way out."""


def read_text_file(path) -> str:
    """A user's text file (dataset spec, template) as UTF-8; one that is not is refused with file:line."""
    from pathlib import Path

    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TextadaptError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None
