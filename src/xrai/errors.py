"""One exception type for every user-facing error.

The command line catches :class:`XraiError` and prints its message as a single
line, without a traceback. Raise it for anything the user can fix: a bad
config key, a missing chain, a corrupt file.

Usage::

    from xrai.errors import XraiError
    raise XraiError("config key 'detector.n_pixels': expected an integer >= 8, got -3")
"""


class XraiError(Exception):
    """An error caused by the user's input, reported as one readable line."""
