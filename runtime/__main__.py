"""`python -m dsv4rt`: the same as the `dsv4rt` console script."""
import sys

from .cli import main

sys.exit(main())
