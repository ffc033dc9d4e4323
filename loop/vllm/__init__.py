"""Talking to vLLM: `client.VLLMClient` (one pooled HTTP client) and `process.VLLMSupervisor` (the child process)."""
