"""Backends: where rooms, presence, history and account state live (embedded or Redis)."""
