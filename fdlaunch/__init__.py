"""fdlaunch: chain-loading tools for socket activation, credentials and readiness."""

__version__ = "0.1.0"
