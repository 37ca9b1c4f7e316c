"""Generated from protos/maas/v1 by tools/protos.py. Do not edit."""
