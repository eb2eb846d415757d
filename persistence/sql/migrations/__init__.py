"""Alembic migrations: one linear history, applied by ``persistence.sql.database``.

``HEAD`` names the newest revision, so that a start on a database already
there is one ``SELECT`` with no Alembic import (~0.15 s of every command's
start-up). A new migration must set it (``tests/test_database.py`` compares
it with Alembic's own head).
"""

HEAD = "0010_file_reservations"
