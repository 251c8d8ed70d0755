"""Message ids: ``"<ms>-<seq>"`` strings (the form of Redis stream ids), compared numerically."""

from __future__ import annotations


def id_key(msg_id: str) -> tuple[int, int]:
    """Sort key of a message id; ids are validated by the protocol before they get here."""
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


class IdClock:
    """Assigns strictly increasing ids for one stream, even when the wall clock steps back."""

    __slots__ = ("last_ms", "last_seq")

    def __init__(self) -> None:
        self.last_ms = -1
        self.last_seq = 0

    def next(self, now_ms: int) -> str:
        if now_ms > self.last_ms:
            self.last_ms, self.last_seq = now_ms, 0
        else:
            self.last_seq += 1
        return f"{self.last_ms}-{self.last_seq}"
