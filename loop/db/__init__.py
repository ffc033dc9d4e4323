"""Storage: typed SQLAlchemy models (models.py) and engine/session/migration helpers (session.py)."""
