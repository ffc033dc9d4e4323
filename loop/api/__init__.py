"""The loop API: FastAPI app factory (app.py), shared dependencies (deps.py), routes (routes/)."""
