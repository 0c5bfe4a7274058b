"""systemd's notify protocol (sd_notify): READY=1, STATUS= lines and STOPPING=1.

Only active when systemd started us with NOTIFY_SOCKET set (Type=notify);
otherwise every call does nothing.  sdnotify does the socket work; a failure
to send is logged once, then notifications stop, so they never take the
daemon down.
"""

from __future__ import annotations

import logging
import os

from sdnotify import SystemdNotifier

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to the socket in NOTIFY_SOCKET, if any."""

    def __init__(self) -> None:
        self._notifier: SystemdNotifier | None = None
        self._last_status = ""
        address = os.environ.get("NOTIFY_SOCKET")
        if address:
            try:
                self._notifier = SystemdNotifier(debug=True)
            except OSError as exc:
                log.warning("cannot reach NOTIFY_SOCKET %s (%s): systemd will not hear from us",
                            address, exc)

    @property
    def active(self) -> bool:
        """Whether messages are being sent."""
        return self._notifier is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` fields in one datagram."""
        if self._notifier is None:
            return
        try:
            self._notifier.notify("\n".join(fields))
        except OSError as exc:
            log.warning("sd_notify failed (%s); no more notifications", exc)
            self._notifier = None

    def status(self, text: str) -> None:
        """Set the one-line status systemctl shows; repeated text is not sent again."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def ready(self, status: str) -> None:
        """The mount answers requests."""
        self._last_status = status
        self.send("READY=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for *seconds* more before systemd gives up on start-up (long populates)."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def stopping(self) -> None:
        """We are unmounting and releasing the region."""
        self.send("STOPPING=1", "STATUS=unmounting and releasing the region")
