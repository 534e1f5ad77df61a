"""`python -m dsv4rt` (and `torchrun -m dsv4rt`): the same as the `dsv4rt` console script.

A folder named ``dsv4rt`` in the current directory (a clone of the repository) can shadow the package here,
where the console script is not affected: warn before anything that needs the package, and stop with that
warning (exit 2) if the package cannot import, rather than with an ImportError traceback.
"""
import sys

from .shadow import shadowing_warning

_warning = shadowing_warning()  # this process's sys.path: the current directory comes first under -m
if _warning:
    print(f"dsv4rt: {_warning}", file=sys.stderr)
    try:
        from . import __version__  # noqa: F401
    except ImportError:
        sys.exit(2)

from .cli import main  # noqa: E402

sys.exit(main(shadow_checked=bool(_warning)))
