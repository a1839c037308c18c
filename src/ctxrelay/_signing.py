"""Where a message's context lived before it became the carrier module; kept
for old imports (``ctxrelay._signing.Signer`` may be named by a pickle)."""

from __future__ import annotations

from ._carrier import *  # noqa: F403
from ._carrier import __all__ as __all__
