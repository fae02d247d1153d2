"""Where the bundled default model lives, and the stand-in used until one ships."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import preset

log = logging.getLogger("bitskip.models")

BUNDLED = Path(__file__).parent / "default"


def cache_dir() -> Path:
    return Path(os.environ.get("BITSKIP_CACHE", Path.home() / ".cache" / "bitskip"))


def resolve_model(path: str | Path | None) -> Path:
    """The checkpoint to serve: `path` if given, else the bundled default model, else a random
    tiny-test checkpoint generated once under the cache directory (logged as such)."""
    if path:
        return Path(path)
    if (BUNDLED / "config.json").exists():
        return BUNDLED
    stand_in = cache_dir() / "tiny-test-random"
    if not (stand_in / "config.json").exists():
        from .random_checkpoint import write_random_checkpoint
        write_random_checkpoint(stand_in, preset("tiny-test"))
    log.warning("no bundled default model in %s yet: serving a RANDOM-WEIGHT tiny-test checkpoint "
                "from %s (its text is noise; pass --model DIR for a real model)", BUNDLED, stand_in)
    return stand_in
