"""EI eBPF Agent: every ingress and egress flow of a Linux host, counted in the kernel."""

__version__ = "0.1.0"
