"""Authentication core: keys and access tokens (pyjwt), passwords (argon2id), accounts and sessions.

No sockets here. ``keys`` loads and pins JWT keys, ``tokens`` issues and verifies access tokens,
``passwords`` hashes and checks passwords (``password_service`` runs that off the event loop),
``accounts`` holds the rules of login, refresh rotation, logout and revocation on top of the
abstract :class:`chatd.backends.base.State`. ``jwt.*`` and ``argon2.*`` exceptions stop here.
"""
