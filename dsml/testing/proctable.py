"""The process table, read from ``/proc``: which live processes carry a mark in their
command line (a test's unique argument, ``sleep 1000.<random>``), so a test can check
that nothing it started outlived what should have killed it, and kill the rest by pid."""

from __future__ import annotations

from pathlib import Path

__all__ = ["marked"]


def marked(mark: str, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the live (not zombie) processes whose command line holds ``mark``."""
    found = []
    needle = mark.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
