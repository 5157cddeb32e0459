"""manifest create."""

from __future__ import annotations

from . import Params
from .common import path_argument

MANIFEST_CREATE: Params = (path_argument("path"),)
