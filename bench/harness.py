"""What every benchmark here shares: the interleaving order and the table.

Variants are measured in turns, the order rotated by one place each
repetition, so drift on a shared machine hits every variant alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def rotations(items: Sequence[T], reps: int) -> Iterator[list[T]]:
    """``reps`` orderings of ``items``, rotated one place each time."""
    for rep in range(reps):
        k = rep % len(items)
        yield [*items[k:], *items[:k]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
