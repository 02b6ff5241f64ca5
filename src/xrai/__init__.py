"""xrai: X-ray single-particle imaging, from a PDB entry to a reconstructed molecule.

Usage::

    import xrai
    print(xrai.__version__)
"""

import os
from importlib.metadata import PackageNotFoundError, version

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads
# made a training step ~10x slower (docs/method.md). Only takes effect if torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("xrai")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
