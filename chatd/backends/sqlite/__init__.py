"""The embedded SQLite store: accounts, sessions, revocations (and history)."""
