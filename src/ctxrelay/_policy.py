"""What is sensitive, and the process-wide policy.

The policy is one immutable value read on each decision, so ``configure`` is a
single atomic swap and no lock is held on any hot path.  This module holds
what the core needs today (which names are sensitive, the size limits);
forwarding rules grow here too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Policy", "active", "configure"]

#: Header and field names whose values are credentials.  They are masked in
#: every ``repr`` and never leave the process unless a destination names them.
DEFAULT_SENSITIVE: frozenset[str] = frozenset(
    {
        "authorization",
        "cookie",
        "proxy-authorization",
        "set-cookie",
        "x-api-key",
        "x-auth-token",
        "x-csrf-token",
    }
)

#: A name that *contains* one of these is treated as sensitive too: a
#: ``db_password`` or ``session_token`` field is a secret whatever it is called.
SENSITIVE_FRAGMENTS: tuple[str, ...] = ("password", "passwd", "secret", "token", "credential")

MASK = "***"


def _lowered(names: Iterable[str]) -> frozenset[str]:
    return frozenset(name.lower() for name in names)


@dataclass(frozen=True)
class Policy:
    """What ctxrelay treats as sensitive and how large values may grow.

    A ``Policy`` is a frozen value: build a new one (``dataclasses.replace``)
    and pass it to :func:`configure` to change the process-wide policy.

    ``sensitive``
        Extra names (case-insensitive) to mask, on top of
        :data:`DEFAULT_SENSITIVE` and any name containing one of
        :data:`SENSITIVE_FRAGMENTS`.
    ``request_id_header``
        The header that carries the request id, inbound and outbound.
    """

    sensitive: frozenset[str] = field(default_factory=frozenset)
    request_id_header: str = "x-request-id"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sensitive", _lowered(self.sensitive) | DEFAULT_SENSITIVE)
        object.__setattr__(self, "request_id_header", self.request_id_header.lower())

    def is_sensitive(self, name: str) -> bool:
        """True when values under ``name`` must never be shown or sent freely."""
        lowered = name.lower()
        if lowered in self.sensitive:
            return True
        return any(fragment in lowered for fragment in SENSITIVE_FRAGMENTS)


_active = Policy()


def active() -> Policy:
    """The process-wide policy currently in force."""
    return _active


def configure(policy: Policy) -> Policy:
    """Make ``policy`` the process-wide policy; returns the previous one."""
    global _active
    if not isinstance(policy, Policy):
        raise TypeError(f"configure() takes a ctxrelay.Policy, not {type(policy).__name__}")
    previous, _active = _active, policy
    return previous
