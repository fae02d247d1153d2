"""`python -m engine.kernels.native`: build the native CPU kernel into the cache now (make install,
the Docker image) and say where it is, or why the torch path will be used."""

import logging
import sys

from . import library

logging.basicConfig(level=logging.INFO, format="%(message)s")
lib = library()
print(f"native CPU kernel: {lib._name if lib is not None else 'not built (torch int8 path)'}")
sys.exit(0)
