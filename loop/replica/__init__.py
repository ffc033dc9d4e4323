"""Replicas on other hosts: `loop replica` (agent.py) beside a remote vLLM, and the weight transfer (transfer.py)
between it and the trainer's worker (loop/worker/remotes.py)."""
