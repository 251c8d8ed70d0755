"""The sans-I/O core: plain calls and an injected clock, no asyncio, sockets or backends."""
