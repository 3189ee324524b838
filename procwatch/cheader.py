"""Where the C client header, ``procwatch.h``, is installed.

The header ships inside the package (``procwatch/include/procwatch.h``, as
package data) so that it always matches the ``abi`` module of the same
install.  C programs compile against it with::

    cc -I"$(procwatch --include-dir)" client.c

It is header-only and needs libc alone: nothing to link.
"""

import pathlib as _pathlib

HEADER = "procwatch.h"


def include_dir():
    """Absolute path of the directory that holds ``procwatch.h``."""
    return str(_pathlib.Path(__file__).resolve().with_name("include"))


def header_path():
    """Absolute path of ``procwatch.h`` itself."""
    return str(_pathlib.Path(include_dir()) / HEADER)
