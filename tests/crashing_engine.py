"""A decoder engine that kills its process on every frame, as zxing-cpp crashing would.

A module of its own, importing nothing heavy: the isolated decoder's worker imports it on
every respawn, and the test that uses it must respawn quickly on a slow machine.
"""

from __future__ import annotations

import os
from typing import Any


def _abort(image: Any) -> list[Any]:
    os.abort()


def factory() -> Any:
    return _abort
