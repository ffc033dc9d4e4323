"""The training worker: a subprocess whose HF model is made of views into vLLM's live weights.

handles.py reads the plugin's weight-handle files and maps vLLM's memory (CPU shared memory / CUDA IPC);
views.py builds the HF model on those views. The rest of the package trains on that model.
"""
