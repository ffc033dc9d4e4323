"""tests/faults: the standing fault suite (failed commits, a full disk, kill -9, schema fuzzing) against the real
app. Its modules reuse the database fixtures of tests/unit (`tests.unit.feedback_support`: SQLite and PostgreSQL)."""
