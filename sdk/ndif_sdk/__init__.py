"""ndif's client side: the ``ndif`` command line (the remote backend comes with the service)."""

__version__ = "0.1.0"
