"""Alembic migrations: one linear history, applied by ``persistence.sql.database``."""
