"""PostgreSQL edge: the only package that imports asyncpg.

`Store` owns the pools and the schema (`migrations`); `Tx` is one transaction whose attributes
are the query groups (`tx.images.lock(uuid)`, `tx.ops.finish(...)`), one per `.sql` file of
`image_service/sql/`, each method one named query with named parameters. Handlers receive a
`Tx` and never see a connection.
"""

from image_service.store.database import CONNECTION_ERRORS, Store, Tx, ensure_database
from image_service.store.migrations import LATEST_VERSION, SchemaTooNew

__all__ = ["CONNECTION_ERRORS", "LATEST_VERSION", "SchemaTooNew", "Store", "Tx", "ensure_database"]
