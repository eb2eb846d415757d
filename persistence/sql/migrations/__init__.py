"""Alembic migrations: one linear history, applied by ``persistence.sql.database``.

``HEAD`` names the newest revision, so that a start on a database already
there is one ``SELECT`` with no Alembic import (~0.15 s of every command's
start-up). A new migration must set it (``tests/test_database.py`` compares
it with Alembic's own head).

``TABLES`` names the tables a database at ``HEAD`` has: a new database is
created from the models (not the migrations) only when every one of them is
declared, i.e. when the modules declaring them have been imported (the
wiring imports them first; a bare ``Database`` start takes the migrations).
A migration that adds or drops a table must change it (the same test
compares it with what the migrations build).
"""

HEAD = "0010_file_reservations"
TABLES = frozenset({"messages", "files", "file_reservations", "usage", "recall_log",
                    "chain_heads"})
