"""Tests of the scripts in tools/ (not a package): tools/ goes on sys.path once, so each test imports the
script it checks by its module name."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
