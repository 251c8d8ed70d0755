"""Fixtures for the auth tests: an injectable clock, PEM key files, rings built from config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from chatd.config import AuthConfig, Config, KeySpec, ServerConfig
from tests.clock import Clock

SECRET = "s" * 40  # a valid default HS256 secret (>= 32 bytes)
T0 = 1_800_000_000.0


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@dataclass
class PemPair:
    private: Any
    private_file: Path
    public_file: Path

    @property
    def public_pem(self) -> bytes:
        return self.public_file.read_bytes()


def write_pair(directory: Path, name: str, private: Any) -> PemPair:
    priv = directory / f"{name}.key"
    pub = directory / f"{name}.pub"
    priv.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return PemPair(private, priv, pub)


_RSA_CACHE: dict[str, Any] = {}


def rsa_key(name: str) -> Any:
    # RSA generation is the slow part; one key per name for the whole run keeps tests fast.
    if name not in _RSA_CACHE:
        _RSA_CACHE[name] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _RSA_CACHE[name]


@pytest.fixture
def rsa_pair(tmp_path: Path) -> PemPair:
    return write_pair(tmp_path, "rsa", rsa_key("ours"))


@pytest.fixture
def attacker_rsa_pair(tmp_path: Path) -> PemPair:
    return write_pair(tmp_path, "attacker", rsa_key("attacker"))


@pytest.fixture
def ec_pair(tmp_path: Path) -> PemPair:
    return write_pair(tmp_path, "ec", ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
def ed_pair(tmp_path: Path) -> PemPair:
    return write_pair(tmp_path, "ed", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """``make_config(*keys, jwt_secret=SECRET, **auth)``: a Config with its state in tmp_path."""

    def make(*keys: KeySpec, jwt_secret: str = SECRET, **auth: Any) -> Config:
        return Config(
            server=ServerConfig(state_dir=str(tmp_path / "state")),
            auth=AuthConfig(keys=tuple(keys), **auth),
            jwt_secret=jwt_secret,
        )

    return make
