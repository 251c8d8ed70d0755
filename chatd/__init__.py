"""chatd: a self-hosted real-time chat server speaking a small JSON protocol over WebSocket."""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
