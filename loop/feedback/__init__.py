"""Feedback storage: ratings and comparisons (store), group-committed rating writes (writer), history queries.

Training data is built from this feedback in one place only: `loop.pairs`.
"""

from loop.feedback.store import (
    ComparisonInput,
    Outcome,
    RatingInput,
    write_comparison,
    write_ratings,
)
from loop.feedback.writer import RatingWriter

__all__ = ["ComparisonInput", "Outcome", "RatingInput", "RatingWriter", "write_comparison", "write_ratings"]
