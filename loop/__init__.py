"""loop: an online reinforcement-learning loop around a vLLM server.

vLLM serves a chat model; loop logs every response, collects ratings and A/B picks, turns them into preference
batches and trains in place on vLLM's own weight memory. See README.md for the architecture.
"""

__version__ = "0.1.0"
