"""JWT keys: which keys exist, which algorithm each is bound to, which one signs.

A :class:`KeyRing` is built once from the configuration (and again on SIGHUP) and then only read.
Every key is bound to exactly one algorithm, so the algorithm a token's header names can never
change how a key is used: an ``HS256`` token presented with the ``kid`` of an RSA key is refused
before any cryptography runs (the classic "public key as HMAC secret" attack), and pyjwt's
``prepare_key`` refuses PEM material as an HMAC secret as a second line of defence.

Keys come from:

- ``[[auth.keys]]`` entries (:class:`chatd.config.KeySpec`): HS256/384/512 secrets from
  ``secret_env`` or ``secret_file``; RS256, ES256, EdDSA public keys from ``public_key_file``
  (PEM) and, for a signing key, the private key from ``private_key_file``; optionally a JWKS
  file (``jwks_file``) of public keys, each with its own ``kid``.
- the *default key*, HS256 without ``kid``: ``CHATD_JWT_SECRET`` when set, else the secret chatd
  generates on first run in ``<state_dir>/jwt-secret``. It signs unless a configured key has
  ``signing = true``, and it is what ``chatd token issue`` uses out of the box.

A token with a ``kid`` is verified with that key only; a token without ``kid`` is tried against
the keys without ``kid`` (the default key, and a configured key whose ``kid`` is empty) whose
algorithm matches its header.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from chatd.config import Config, KeySpec
from chatd.errors import ConfigError

#: Algorithms a key may be bound to (contract section 2). ``none`` is never one of them.
ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA")
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})

#: RFC 7518 3.2: an HMAC key at least as long as the hash output. The contract's floor is 32.
MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: NIST SP 800-131A; pyjwt warns below this too.
MIN_RSA_BITS = 2048

#: A ``kid`` is a short name, never a path: ``../../etc/passwd`` is simply an unknown key.
KID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")

SECRET_FILE_NAME = "jwt-secret"
DEFAULT_KEY_NAME = "CHATD_JWT_SECRET"


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key, bound to one algorithm.

    Attributes:
        kid: the key id (``""`` for a key matched by tokens without ``kid``).
        alg: the only algorithm this key verifies and signs.
        verify_key: the HMAC secret (bytes) or the public key object.
        sign_key: the HMAC secret or the private key object; None for verify-only keys.
        source: where it came from, for messages (``auth.keys[0]``, ``CHATD_JWT_SECRET``).
    """

    kid: str
    alg: str
    verify_key: Any
    sign_key: Any
    source: str

    def __repr__(self) -> str:  # never print key material
        return f"Key(kid={self.kid!r}, alg={self.alg!r}, source={self.source!r})"


def ensure_local_secret(state_dir: Path) -> tuple[str, bool]:
    """Read ``<state_dir>/jwt-secret``, or create it on first run.

    The secret is ``secrets.token_urlsafe(32)`` (32 random bytes, 43 characters). The directory is
    created with mode 0700, the file with 0600; the file is written under a temporary name and
    hard-linked into place, so a reader never sees half a secret and two processes starting at
    once (``chatd serve`` and ``chatd token issue``) end up with the same one.

    Returns:
        ``(secret, created)``.

    Raises:
        ConfigError: the directory or file cannot be created or read, or the file holds fewer
            than 32 bytes.
    """
    path = Path(state_dir) / SECRET_FILE_NAME
    existing = _read_secret_file(path)
    if existing is not None:
        return existing, False
    try:
        Path(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            "server.state_dir", f"cannot create {state_dir}: {exc.strerror}"
        ) from None
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{SECRET_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secret + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces a secret another process wrote
        except FileExistsError:
            raced = _read_secret_file(path)
            if raced is None:  # pragma: no cover - deleted between link and read
                raise ConfigError(str(path), "disappeared while being created") from None
            return raced, False
        finally:
            os.unlink(tmp)
        _fsync_dir(Path(state_dir))
    except OSError as exc:
        raise ConfigError(str(path), f"cannot write: {exc.strerror}") from None
    return secret, True


def _read_secret_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {getattr(exc, 'strerror', exc)}") from None
    if len(text.encode()) < 32:
        raise ConfigError(
            str(path), "must hold at least 32 bytes (delete it to generate a new one)"
        )
    return text


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class KeyRing:
    """The configured keys by ``kid``, and the signing key.

    Immutable once built; reloading keys means building a new ring and swapping it in
    (``TokenVerifier.keyring = new``), so connections verified with the old ring stay open.
    """

    def __init__(self, keys: list[Key], signer: Key | None) -> None:
        """Build from already validated keys; use :meth:`from_config` normally.

        Raises:
            ConfigError: two keys with the same non-empty ``kid``.
        """
        self._by_kid: dict[str, Key] = {}
        self._kidless: list[Key] = []
        for key in keys:
            if not key.kid:
                self._kidless.append(key)
            elif key.kid in self._by_kid:
                raise ConfigError(key.source, f"duplicate kid {key.kid!r}")
            else:
                self._by_kid[key.kid] = key
        self.signer = signer

    @property
    def keys(self) -> list[Key]:
        """Every key, those with ``kid`` first."""
        return [*self._by_kid.values(), *self._kidless]

    def by_kid(self, kid: str) -> Key | None:
        """The key named ``kid``; None for unknown or malformed names."""
        return self._by_kid.get(kid) if KID_RE.match(kid) else None

    def kidless(self) -> list[Key]:
        """Keys tried for a token that names no ``kid``."""
        return list(self._kidless)

    def __repr__(self) -> str:
        return f"KeyRing(keys={self.keys!r}, signer={self.signer!r})"

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        create_secret: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> tuple[KeyRing, Path | None]:
        """Load every key of ``config`` plus the default HS256 key.

        Args:
            config: the validated configuration.
            create_secret: create ``<state_dir>/jwt-secret`` when no ``CHATD_JWT_SECRET`` is set
                and the file does not exist. Without it (``chatd check-config``) a missing file
                just means no default key.
            env: where ``secret_env`` names are looked up (default ``os.environ``); keys name
                their own variables, so config.py cannot resolve them in advance.

        Returns:
            ``(ring, created)``: ``created`` is the path of a secret file created now, else None,
            so the caller can say so in one log line.

        Raises:
            ConfigError: naming the key (``auth.keys[0].public_key_file: cannot read ...``).
        """
        env = os.environ if env is None else env
        keys: list[Key] = []
        signer: Key | None = None
        for i, spec in enumerate(config.auth.keys):
            loaded = _load_spec(spec, f"auth.keys[{i}]", env)
            keys.extend(loaded)
            if spec.signing:
                signer = loaded[0]
        created: Path | None = None
        default: Key | None = None
        if config.jwt_secret:
            default = _hmac_key("", "HS256", config.jwt_secret.encode(), DEFAULT_KEY_NAME)
        else:
            path = config.state_dir / SECRET_FILE_NAME
            if create_secret:
                secret, was_created = ensure_local_secret(config.state_dir)
                created = path if was_created else None
            else:
                secret = _read_secret_file(path) or ""
            if secret:
                default = _hmac_key("", "HS256", secret.encode(), str(path))
        if default is not None:
            keys.append(default)
            signer = signer or default
        return cls(keys, signer), created


def _load_spec(spec: KeySpec, where: str, env: Mapping[str, str]) -> list[Key]:
    """Keys of one ``[[auth.keys]]`` entry (several for a JWKS file)."""
    jwks_file = str(getattr(spec, "jwks_file", "") or "")
    if jwks_file:
        if spec.signing:
            raise ConfigError(f"{where}.signing", "a JWKS file holds public keys and cannot sign")
        return _load_jwks(jwks_file, f"{where}.jwks_file")
    if spec.alg not in ALGORITHMS:
        raise ConfigError(
            f"{where}.alg", f"must be one of {', '.join(ALGORITHMS)}, got {spec.alg!r}"
        )
    if spec.kid and not KID_RE.match(spec.kid):
        raise ConfigError(
            f"{where}.kid", "may contain only letters, digits, '.', '_' and '-' (1-128 characters)"
        )
    if spec.alg in HMAC_ALGORITHMS:
        if spec.public_key_file or spec.private_key_file:
            raise ConfigError(
                where, f"{spec.alg} takes secret_env or secret_file, not PEM key files"
            )
        if bool(spec.secret_env) == bool(spec.secret_file):
            raise ConfigError(where, f"{spec.alg} needs exactly one of secret_env or secret_file")
        if spec.secret_env:
            value = env.get(spec.secret_env, "")
            if not value:
                raise ConfigError(f"{where}.secret_env", f"variable {spec.secret_env} is not set")
            return [_hmac_key(spec.kid, spec.alg, value.encode(), f"{where}.secret_env")]
        data = _read_file(spec.secret_file, f"{where}.secret_file").strip()
        return [_hmac_key(spec.kid, spec.alg, data, f"{where}.secret_file")]
    if spec.secret_env or spec.secret_file:
        raise ConfigError(where, f"{spec.alg} takes PEM key files, not a secret")
    public = private = None
    if spec.public_key_file:
        where_pub = f"{where}.public_key_file"
        public = _load_pem(spec.alg, _read_file(spec.public_key_file, where_pub), where_pub, False)
    if spec.private_key_file:
        where_priv = f"{where}.private_key_file"
        private = _load_pem(
            spec.alg, _read_file(spec.private_key_file, where_priv), where_priv, True
        )
    if spec.signing and private is None:
        raise ConfigError(f"{where}.private_key_file", "required for the signing key")
    if public is None and private is None:
        raise ConfigError(where, f"{spec.alg} needs public_key_file (and private_key_file to sign)")
    if private is not None:
        derived = private.public_key()
        if public is not None and _spki(public) != _spki(derived):
            raise ConfigError(where, "public_key_file and private_key_file are not a pair")
        public = derived
    return [Key(spec.kid, spec.alg, public, private, where)]


def _hmac_key(kid: str, alg: str, secret: bytes, where: str) -> Key:
    minimum = MIN_SECRET_BYTES[alg]
    if len(secret) < minimum:
        raise ConfigError(where, f"must be at least {minimum} bytes for {alg}")
    try:
        prepared = get_default_algorithms()[alg].prepare_key(secret)
    except jwt.InvalidKeyError:
        # pyjwt refuses PEM/SSH material as an HMAC secret: that is the confusion attack.
        raise ConfigError(where, "looks like a public/private key, not an HMAC secret") from None
    return Key(kid, alg, prepared, prepared, where)


def _read_file(name: str, where: str) -> bytes:
    try:
        return Path(name).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(where, f"cannot read {name}: {exc.strerror}") from None


_PUBLIC_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_PRIVATE_TYPES: dict[str, tuple[type, ...]] = {
    "RS256": (rsa.RSAPrivateKey,),
    "ES256": (ec.EllipticCurvePrivateKey,),
    "EdDSA": (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey),
}


def _load_pem(alg: str, data: bytes, where: str, private: bool) -> Any:
    """A PEM key of exactly the type ``alg`` needs (an EC key is no RS256 key)."""
    kind = "private" if private else "public"
    try:
        key: Any = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as exc:
        encrypted = "password" in str(exc).lower() or "encrypted" in str(exc).lower()
        detail = (
            "encrypted private keys are not supported" if encrypted else f"not a PEM {kind} key"
        )
        raise ConfigError(where, detail) from None
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise ConfigError(where, f"not a usable PEM {kind} key ({type(exc).__name__})") from None
    expected = (_PRIVATE_TYPES if private else _PUBLIC_TYPES)[alg]
    if not isinstance(key, expected):
        raise ConfigError(where, f"is a {_describe(key)} key, not a {alg} {kind} key")
    _check_strength(alg, key, where)
    return key


def _check_strength(alg: str, key: Any, where: str) -> None:
    if alg == "RS256" and key.key_size < MIN_RSA_BITS:
        raise ConfigError(where, f"RSA key of {key.key_size} bits, at least {MIN_RSA_BITS} needed")
    if alg == "ES256" and not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(where, f"ES256 needs a P-256 key, got {key.curve.name}")


def _describe(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return f"EC {key.curve.name}"
    if isinstance(
        key,
        ed25519.Ed25519PublicKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PublicKey
        | ed448.Ed448PrivateKey,
    ):
        return "EdDSA"
    return type(key).__name__


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _load_jwks(name: str, where: str) -> list[Key]:
    """Public keys of a JWKS file; each needs a ``kid`` and is bound to its ``alg``.

    A key without ``alg`` gets the one its type implies (RSA -> RS256, EC P-256 -> ES256,
    OKP -> EdDSA). Symmetric (``oct``) and private keys are refused: a JWKS file is published
    material, and a secret in it would not be one.
    """
    try:
        document = json.loads(_read_file(name, where))
    except ValueError:
        raise ConfigError(where, "not valid JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(where, 'must be a JSON object with a non-empty "keys" list')
    keys: list[Key] = []
    for j, entry in enumerate(entries):
        at = f"{where}: keys[{j}]"
        if not isinstance(entry, dict):
            raise ConfigError(at, "must be an object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not KID_RE.match(kid):
            raise ConfigError(at, "needs a kid of letters, digits, '.', '_' and '-'")
        if entry.get("kty") == "oct" or "d" in entry:
            raise ConfigError(at, "secret or private keys do not belong in a JWKS file")
        alg = entry.get("alg")
        if alg is not None and alg not in ALGORITHMS:
            raise ConfigError(at, f"alg must be one of {', '.join(ALGORITHMS)}, got {alg!r}")
        try:
            jwk = jwt.PyJWK(entry, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise ConfigError(at, f"unusable key: {exc}") from None
        bound = jwk.algorithm_name
        if bound not in ALGORITHMS:
            raise ConfigError(at, f"alg {bound!r} is not allowed")
        public = jwk.key
        if not isinstance(public, _PUBLIC_TYPES.get(bound, ())):
            raise ConfigError(at, f"is a {_describe(public)} key, not a {bound} public key")
        _check_strength(bound, public, at)
        keys.append(Key(kid, bound, public, None, at))
    return keys
