"""Where the door lived before it moved into the core; kept for old imports.

The door (turning an inbound request into its ``Context``) is protocol, not
framework glue: it lives in :mod:`ctxrelay._inbound`, and the web
integrations only adapt their framework to it.
"""

from __future__ import annotations

from .._inbound import *  # noqa: F403
from .._inbound import __all__ as __all__
