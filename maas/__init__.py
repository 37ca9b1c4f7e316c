"""maas-mesh: a Model-as-a-Service mesh."""

__version__ = "0.1.0"
