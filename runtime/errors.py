"""Errors qmoe reports to users.

Every error a user can cause derives from ``QmoeError`` so the CLI can print one line and exit
non-zero without a traceback; bad values also derive from ``ValueError`` so library callers can
catch them the usual way.
"""

from __future__ import annotations


class QmoeError(Exception):
    """Base of every error qmoe raises on purpose; its message is one line for the user."""
