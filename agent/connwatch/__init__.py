"""connwatch: an eBPF connection-capacity agent for Prometheus."""

__version__ = "0.1.0"
