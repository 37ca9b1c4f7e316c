"""The four services. Each folder holds one: its gRPC servicer (a thin adapter), its core
logic, and `main.py` with the `maas <service>` entry point."""
