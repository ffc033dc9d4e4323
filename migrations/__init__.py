"""Alembic migrations for loop's database. Run by `loop serve` at start-up and by `loop db upgrade|downgrade`."""
