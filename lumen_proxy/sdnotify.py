"""sd_notify(3) in a few lines of stdlib, so Type=notify needs no libsystemd binding.

systemd passes the address of its notification socket in $NOTIFY_SOCKET: a file-system path,
or an abstract socket written with a leading '@'. Each call sends one datagram of
newline-separated KEY=VALUE assignments. Outside systemd the variable is unset and every call
is a cheap no-op returning False, so the server calls these functions unconditionally.

A failed send is logged and reported as False, never raised: a notification is worth less than
the requests the server is handling.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "status", "stopping"]

logger = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1" or "STATUS=draining 3 streams") to the service manager.

    Returns True once the datagram is sent; False when not run by systemd or the send failed.
    """
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the server is listening (also ends a reload started by `reloading`)."""
    return notify(_with_status("READY=1", status_text))


def reloading() -> bool:
    """Tell systemd a config reload has begun; send `ready` when it ends, even if it failed.

    MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this message to the SIGHUP
    it sent; older versions ignore it.
    """
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd the server is draining and will exit on its own."""
    return notify(_with_status("STOPPING=1", status_text))


def status(text: str) -> bool:
    """Set the one-line text `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}")


def _with_status(state: str, status_text: str | None) -> str:
    return state if status_text is None else f"{state}\nSTATUS={_one_line(status_text)}"


def _one_line(text: str) -> str:
    # A newline would start a new assignment: STATUS text must not be able to inject one.
    return " ".join(text.splitlines())


def _socket_address(value: str) -> str | None:
    """Map $NOTIFY_SOCKET to a sendto() address; None when unset or not a unix socket."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # unset, or a kind we do not speak (e.g. "vsock:" from systemd >= 254)
