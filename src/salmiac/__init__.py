"""Salmiac: run unmodified container images inside AWS Nitro Enclaves."""

__version__ = "0.1.0"
