"""The ``log.failure`` events of a simulated run (:class:`FailureLog`): what the code
logged as a bug, kept for the checks."""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver
from zope.interface import implementer


@implementer(ILogObserver)
class FailureLog:
    """Keeps every ``log.failure`` event (bugs, not bad input) while installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.events.append(event)

    def messages(self) -> list[str]:
        """One line per failure: what was logged and the exception."""
        from twisted.logger import formatEvent

        return [
            f"{formatEvent(e)}: {e['log_failure'].getErrorMessage()}" for e in self.events
        ]


__all__ = ["FailureLog"]
