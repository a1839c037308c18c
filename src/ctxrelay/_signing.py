"""Where a message's context lived before it became the carrier module; kept
for old imports (``ctxrelay._signing.Signer`` may be named by a pickle)."""

from __future__ import annotations

from ._carrier import (
    KEY,
    SIGNATURE,
    WORKER_FIELDS,
    Secret,
    Signer,
    as_signer,
    binding,
    capture,
    restore,
    with_local,
)

__all__ = [
    "KEY",
    "SIGNATURE",
    "WORKER_FIELDS",
    "Secret",
    "Signer",
    "as_signer",
    "binding",
    "capture",
    "restore",
    "with_local",
]
