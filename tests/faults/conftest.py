"""tests/faults: the standing fault suite (failed commits, a full disk, ...) against the real app.

Its modules reuse the database fixtures of tests/unit (`feedback_support`: SQLite and PostgreSQL), so that folder
goes on sys.path here, as pytest's rootdir-relative imports put it there for tests/unit itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

UNIT = str(Path(__file__).resolve().parents[1] / "unit")
if UNIT not in sys.path:
    sys.path.insert(0, UNIT)
