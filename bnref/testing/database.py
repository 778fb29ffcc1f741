"""One saved-example space per checked implementation, inside the user's example database.

hypothesis keys saved examples by a digest of the test function. ``check_batch_norm`` runs one
inner test function for every implementation, convention and dtype, so under a single key a
failure saved for one implementation would be replayed, found passing and *deleted* by the
next. ``KeyedDatabase`` prefixes every key, so each gets its own space in the same database
(the profile's ``settings.database``: a failure replays on the next run as usual).

This module needs hypothesis (a test dependency); ``check`` imports it only when hypothesis is
installed.
"""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis.database import ExampleDatabase


class KeyedDatabase(ExampleDatabase):
    """``db`` with ``prefix`` in front of every key (save, fetch, delete and move)."""

    def __init__(self, db: ExampleDatabase, prefix: bytes) -> None:
        super().__init__()
        self.db = db
        self.prefix = bytes(prefix)

    def __repr__(self) -> str:
        return f"KeyedDatabase({self.db!r}, {self.prefix!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyedDatabase) and (self.db, self.prefix) == (other.db, other.prefix)

    def __hash__(self) -> int:
        return hash((id(self.db), self.prefix))

    def save(self, key: bytes, value: bytes) -> None:
        """Save ``value`` under the prefixed ``key``."""
        self.db.save(self.prefix + key, value)

    def fetch(self, key: bytes) -> Iterable[bytes]:
        """The values saved under the prefixed ``key``."""
        yield from self.db.fetch(self.prefix + key)

    def delete(self, key: bytes, value: bytes) -> None:
        """Remove ``value`` from the prefixed ``key``."""
        self.db.delete(self.prefix + key, value)

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        """Move ``value`` between the prefixed keys."""
        self.db.move(self.prefix + src, self.prefix + dest, value)
