"""Upgrading an open progress database to the schema this code knows.

``PRAGMA user_version`` holds the schema version; ``MIGRATIONS[i]`` (:mod:`tutor.progress.schema`)
takes the database from version ``i`` to ``i + 1``. All pending steps run in one ``BEGIN
IMMEDIATE`` transaction: an upgrade is applied whole or not at all, and two instances starting
together upgrade once (the second re-reads the version under the lock and finds nothing to do).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tutor.progress import schema
from tutor.progress.errors import StoreError


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Run the pending migrations on ``conn`` (the database at ``path``, named in errors)."""
    latest = len(schema.MIGRATIONS)
    try:
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) == latest:
            return
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot upgrade the progress database {path}: {exc}") from exc
    version = latest
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # re-read under the lock
        if version > latest:
            raise StoreError(
                f"The progress database {path} was just upgraded by a newer quant-tutor "
                f"(schema version {version}; this version understands up to {latest})."
            )
        for step in range(version, latest):
            schema.MIGRATIONS[step](conn)
        conn.execute(f"PRAGMA user_version = {latest}")
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(
                f"Upgrading the progress database {path} from schema version {version} to "
                f"{latest} failed ({exc}); it was left unchanged."
            ) from exc
        raise
