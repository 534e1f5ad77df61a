"""The fuzz suite (tests/fuzz): hostile and edge-case inputs for every op and CPU variant, the plug-in
machinery and concurrency. Native code runs in child processes (tests/fuzz/_child.py). The default run
is a fast seeded subset; ``python -m pytest tests/fuzz --fuzz-full`` runs every case."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
