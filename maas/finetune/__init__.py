"""Fine-tuning jobs: dataset validation and loading (`datasets.py`).

Nothing here imports torch, so the CLI can validate a dataset before uploading it
without paying for the training stack.
"""
