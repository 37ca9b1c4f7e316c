"""router: the front door. Picks a ready replica (pool.py) and forwards Inference calls to it."""
