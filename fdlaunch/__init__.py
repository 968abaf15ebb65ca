"""fdlaunch: chain-loading tools for socket activation, credentials and readiness.

The library's public surface is small and imported lazily, so that the
tools, which import this package first, start fast:

    fdlaunch.notify("READY=1")   send an sd_notify message (see fdlaunch.sdnotify.notify)
"""

__version__ = "0.1.0"


def notify(*lines, pid=None, environ=None, wait=False):
    """Send lines such as 'READY=1' to $NOTIFY_SOCKET; see fdlaunch.sdnotify.notify."""
    from fdlaunch.sdnotify import notify as send

    return send(*lines, pid=pid, environ=environ, wait=wait)
