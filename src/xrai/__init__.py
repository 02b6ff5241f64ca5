"""xrai: X-ray single-particle imaging, from a PDB entry to a reconstructed molecule.

Usage::

    import xrai
    print(xrai.__version__)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrai")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
