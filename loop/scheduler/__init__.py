"""Closing the loop: the scheduler (when to train), batch building (on what) and the eval guard (whether to keep it).

- `scheduler.py`: `Scheduler(state)`, the asyncio task in the API process.
- `batches.py`: feedback → DPO pairs / KTO examples, held-out split, dedupe, rater balance, truncation.
- `guard.py`: held-out preference accuracy and canary perplexity through vLLM's own API; rollback verdict.
"""

from loop.scheduler.scheduler import Scheduler

__all__ = ["Scheduler"]
