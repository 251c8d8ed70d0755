"""Key loading: the generated secret, configured keys, and every way a key can be refused."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatd import config as config_mod
from chatd.auth.keys import KeyRing, ensure_local_secret
from chatd.auth.tokens import TokenIssuer, TokenVerifier
from chatd.config import KeySpec
from chatd.errors import ConfigError, InvalidInput


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_run_creates_a_private_secret_and_later_runs_reuse_it(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    secret, created = ensure_local_secret(state)
    assert created and len(secret) >= 43  # token_urlsafe(32): 32 random bytes
    assert _mode(state) == 0o700 and _mode(state / "jwt-secret") == 0o600
    assert ensure_local_secret(state) == (secret, False)
    assert [p.name for p in state.iterdir()] == ["jwt-secret"]  # no temporary file left behind


def test_concurrent_first_runs_agree_on_one_secret(tmp_path: Path) -> None:
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_local_secret(tmp_path)[0]))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8


def test_a_truncated_secret_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "jwt-secret").write_text("short\n")
    with pytest.raises(ConfigError, match="jwt-secret: must hold at least 32 bytes"):
        ensure_local_secret(tmp_path)


def test_an_uncreatable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"server\.state_dir"):
        ensure_local_secret(blocker / "state")


def test_the_default_key_comes_from_the_generated_file_and_signs(make_config: Any) -> None:
    cfg = make_config(jwt_secret="")
    ring, created = KeyRing.from_config(cfg)
    assert created == cfg.state_dir / "jwt-secret"
    assert ring.signer is not None and ring.signer.kid == "" and ring.signer.alg == "HS256"
    again, created_again = KeyRing.from_config(cfg)
    assert created_again is None
    token, _ = TokenIssuer(ring).issue("alice", 60)
    assert TokenVerifier(again, leeway=0).verify(token).sub == "alice"


def test_chatd_jwt_secret_overrides_the_generated_file(make_config: Any) -> None:
    ring, created = KeyRing.from_config(make_config(jwt_secret="e" * 32))
    assert created is None and ring.signer is not None
    assert ring.signer.source == "CHATD_JWT_SECRET"
    assert ring.signer.verify_key == b"e" * 32


def test_without_create_secret_nothing_is_written_and_nothing_signs(make_config: Any) -> None:
    cfg = make_config(jwt_secret="")
    ring, created = KeyRing.from_config(cfg, create_secret=False)
    assert created is None and ring.signer is None and ring.keys == []
    assert not cfg.state_dir.exists()
    with pytest.raises(InvalidInput, match="no signing key"):
        TokenIssuer(ring).issue("alice", 60)


def test_a_short_chatd_jwt_secret_is_refused_by_name(make_config: Any) -> None:
    with pytest.raises(ConfigError, match=r"^CHATD_JWT_SECRET: must be at least 32 bytes"):
        KeyRing.from_config(make_config(jwt_secret="x" * 31))


def test_config_load_refuses_a_short_chatd_jwt_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CHATD_JWT_SECRET"):
        config_mod.load(env={"CHATD_JWT_SECRET": "short", "CHATD_STATE_DIR": str(tmp_path)})


def test_keys_from_a_toml_file_load_end_to_end(tmp_path: Path, ec_pair: Any) -> None:
    toml = tmp_path / "chatd.toml"
    toml.write_text(
        f"""
[auth]
[[auth.keys]]
kid = "ext-1"
alg = "ES256"
public_key_file = "{ec_pair.public_file}"
[[auth.keys]]
kid = "hs"
alg = "HS384"
secret_env = "MY_HS_SECRET"
"""
    )
    env = {"CHATD_STATE_DIR": str(tmp_path / "s"), "MY_HS_SECRET": "h" * 48}
    cfg = config_mod.load(toml, env=env)
    ring, _ = KeyRing.from_config(cfg, env=env)
    assert [(k.kid, k.alg) for k in ring.keys] == [
        ("ext-1", "ES256"),
        ("hs", "HS384"),
        ("", "HS256"),
    ]
    assert ring.signer is not None and ring.signer.kid == ""  # verify-only keys never sign


@pytest.mark.parametrize(
    ("spec", "env", "message"),
    [
        (
            KeySpec(kid="a", alg="none", secret_env="K"),
            {"K": "x" * 64},
            r"auth.keys\[0\].alg: must be one of",
        ),
        (KeySpec(kid="a", alg="PS256", secret_env="K"), {"K": "x" * 64}, r"auth.keys\[0\].alg"),
        (KeySpec(kid="../x", alg="HS256", secret_env="K"), {"K": "x" * 64}, r"auth.keys\[0\].kid"),
        (KeySpec(kid="a b", alg="HS256", secret_env="K"), {"K": "x" * 64}, r"auth.keys\[0\].kid"),
        (KeySpec(kid="a", alg="HS256", secret_env="K"), {"K": "x" * 31}, r"at least 32 bytes"),
        (KeySpec(kid="a", alg="HS384", secret_env="K"), {"K": "x" * 47}, r"at least 48 bytes"),
        (KeySpec(kid="a", alg="HS512", secret_env="K"), {"K": "x" * 63}, r"at least 64 bytes"),
        (KeySpec(kid="a", alg="HS256", secret_env="K"), {}, r"secret_env: variable K is not set"),
        (KeySpec(kid="a", alg="HS256"), {}, r"exactly one of secret_env or secret_file"),
        (
            KeySpec(kid="a", alg="HS256", secret_file="/nonexistent/s"),
            {},
            r"secret_file: cannot read",
        ),
        (
            KeySpec(kid="a", alg="RS256", public_key_file="/nonexistent/k.pem"),
            {},
            r"auth.keys\[0\].public_key_file: cannot read /nonexistent/k.pem",
        ),
        (KeySpec(kid="a", alg="RS256"), {}, r"needs public_key_file"),
        (KeySpec(kid="a", alg="RS256", secret_env="K"), {"K": "x" * 64}, r"takes PEM key files"),
    ],
)
def test_bad_key_specs_are_refused_with_a_message_naming_the_key(
    make_config: Any, spec: KeySpec, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        KeyRing.from_config(make_config(spec), env=env)


def test_a_pem_public_key_given_as_an_hmac_secret_is_refused(
    make_config: Any, rsa_pair: Any
) -> None:
    spec = KeySpec(kid="a", alg="HS256", secret_file=str(rsa_pair.public_file))
    with pytest.raises(ConfigError, match="not an HMAC secret"):
        KeyRing.from_config(make_config(spec))


@pytest.mark.parametrize(
    ("alg", "pair_name", "message"),
    [
        ("RS256", "ec_pair", "is a EC secp256r1 key, not a RS256 public key"),
        ("ES256", "rsa_pair", "is a RSA key, not a ES256 public key"),
        ("EdDSA", "rsa_pair", "not a EdDSA public key"),
        ("RS256", "ed_pair", "not a RS256 public key"),
    ],
)
def test_a_pem_key_of_the_wrong_type_is_refused(
    request: pytest.FixtureRequest, make_config: Any, alg: str, pair_name: str, message: str
) -> None:
    pair = request.getfixturevalue(pair_name)
    spec = KeySpec(kid="a", alg=alg, public_key_file=str(pair.public_file))
    with pytest.raises(ConfigError, match=message):
        KeyRing.from_config(make_config(spec))


def test_garbage_in_a_pem_file_is_refused(make_config: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=r"auth.keys\[0\].public_key_file: not a PEM public key"):
        KeyRing.from_config(make_config(KeySpec(kid="a", alg="RS256", public_key_file=str(bad))))


def test_an_es256_key_on_another_curve_and_a_short_rsa_key_are_refused(
    make_config: Any, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization

    def pub(key: Any, name: str) -> str:
        path = tmp_path / name
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return str(path)

    p384 = pub(ec.generate_private_key(ec.SECP384R1()), "p384.pem")
    with pytest.raises(ConfigError, match="ES256 needs a P-256 key"):
        KeyRing.from_config(make_config(KeySpec(kid="a", alg="ES256", public_key_file=p384)))
    short = pub(rsa.generate_private_key(public_exponent=65537, key_size=1024), "r1024.pem")
    with pytest.raises(ConfigError, match="RSA key of 1024 bits"):
        KeyRing.from_config(make_config(KeySpec(kid="a", alg="RS256", public_key_file=short)))


def test_a_signing_key_needs_its_private_key_and_the_pair_must_match(
    make_config: Any, rsa_pair: Any, attacker_rsa_pair: Any
) -> None:
    with pytest.raises(ConfigError, match="private_key_file: required for the signing key"):
        KeyRing.from_config(
            make_config(
                KeySpec(
                    kid="a", alg="RS256", public_key_file=str(rsa_pair.public_file), signing=True
                )
            )
        )
    with pytest.raises(ConfigError, match="are not a pair"):
        KeyRing.from_config(
            make_config(
                KeySpec(
                    kid="a",
                    alg="RS256",
                    public_key_file=str(rsa_pair.public_file),
                    private_key_file=str(attacker_rsa_pair.private_file),
                )
            )
        )


def test_a_private_key_alone_also_verifies(make_config: Any, ed_pair: Any) -> None:
    spec = KeySpec(kid="ed", alg="EdDSA", private_key_file=str(ed_pair.private_file), signing=True)
    ring, _ = KeyRing.from_config(make_config(spec))
    token, _ = TokenIssuer(ring).issue("bob", 60)
    assert TokenVerifier(ring, leeway=0).verify(token).sub == "bob"


def test_a_configured_hs256_secret_file_is_read_and_stripped(
    make_config: Any, tmp_path: Path
) -> None:
    path = tmp_path / "secret"
    path.write_text("f" * 40 + "\n")
    ring, _ = KeyRing.from_config(
        make_config(KeySpec(kid="file", alg="HS256", secret_file=str(path), signing=True))
    )
    assert ring.signer is not None and ring.signer.kid == "file"
    assert ring.signer.verify_key == b"f" * 40


def test_key_reprs_never_show_key_material(make_config: Any) -> None:
    ring, _ = KeyRing.from_config(make_config(jwt_secret="q" * 40))
    assert "q" * 10 not in repr(ring)


class _Spec(KeySpec):
    """A KeySpec with the ``jwks_file`` field the config may grow."""

    jwks_file: str = ""

    def __init__(self, jwks_file: str, **kw: Any) -> None:
        super().__init__(**kw)
        object.__setattr__(self, "jwks_file", jwks_file)


def test_a_jwks_file_provides_public_keys_by_kid(
    make_config: Any, tmp_path: Path, rsa_pair: Any, ec_pair: Any
) -> None:
    jwks = {
        "keys": [
            {
                **json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_pair.private.public_key())),
                "kid": "r1",
                "use": "sig",
            },
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_pair.private.public_key())),
                "kid": "e1",
                "alg": "ES256",
            },
        ]
    }
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    ring, _ = KeyRing.from_config(make_config(_Spec(str(path))))
    assert [(k.kid, k.alg) for k in ring.keys][:2] == [("r1", "RS256"), ("e1", "ES256")]
    verifier = TokenVerifier(ring, leeway=0)
    import time

    now = time.time()
    claims = {"sub": "carol", "iat": now, "exp": now + 60, "jti": "x"}
    assert verifier.verify(jwt.encode(claims, rsa_pair.private, "RS256", headers={"kid": "r1"}))
    assert verifier.verify(jwt.encode(claims, ec_pair.private, "ES256", headers={"kid": "e1"}))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"keys": []}', "non-empty"),
        ('{"keys": [{"kty": "oct", "k": "AAAA", "kid": "s"}]}', "secret or private keys"),
        ('{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}', "needs a kid"),
    ],
)
def test_bad_jwks_files_are_refused(
    make_config: Any, tmp_path: Path, doc: str, message: str
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(doc)
    with pytest.raises(ConfigError, match=message):
        KeyRing.from_config(make_config(_Spec(str(path))))
