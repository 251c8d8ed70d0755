"""Access-token verification: the sans-I/O part of issue 4's attack matrix, and the happy paths."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from chatd.auth.keys import KeyRing
from chatd.auth.tokens import Claims, TokenIssuer, TokenVerifier
from chatd.config import KeySpec
from chatd.errors import AuthError, InvalidInput

SECRET = "k" * 40
OTHER = "o" * 40
T0 = 1_800_000_000.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(
    header: dict[str, Any], payload: dict[str, Any] | str, hmac_key: bytes | None = None
) -> str:
    """A token built by hand, as an attacker would: HMAC-SHA256 with any bytes, or unsigned."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body.encode())}"
    sig = b"" if hmac_key is None else hmac.new(hmac_key, signing_input.encode(), "sha256").digest()
    return f"{signing_input}.{b64(sig)}"


def payload(now: float = T0, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": now, "exp": now + 900, "jti": "j1"}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(claims: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=alg, headers=headers or None)


def refused(verifier: TokenVerifier, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    err = info.value
    # The reason is short and never echoes the credential.
    assert not token or token not in str(err)
    for part in token.split("."):
        if len(part) > 8:
            assert part not in err.reason
    return err


@pytest.fixture
def ring(make_config: Any) -> KeyRing:
    ring, _ = KeyRing.from_config(make_config(jwt_secret=SECRET))
    return ring


@pytest.fixture
def verifier(ring: KeyRing, clock: Any) -> TokenVerifier:
    return TokenVerifier(ring, leeway=30, clock=clock)


# --- happy paths -------------------------------------------------------------------------------


def test_a_token_from_the_issuer_verifies_with_every_claim(ring: KeyRing, clock: Any) -> None:
    token, issued = TokenIssuer(ring, clock=clock).issue("alice", 900, sid="s_abc", role="admin")
    claims = TokenVerifier(ring, leeway=30, clock=clock).verify(token)
    assert claims == issued
    assert claims.sub == "alice" and claims.sid == "s_abc" and claims.is_admin
    assert claims.iat == T0 and claims.exp == T0 + 900
    assert jwt.get_unverified_header(token)["typ"] == "JWT"


def test_a_token_without_role_is_not_admin(verifier: TokenVerifier) -> None:
    claims = verifier.verify(sign(payload(role="user")))
    assert not claims.is_admin
    assert not Claims(sub="a", jti="j", iat=0, exp=1).is_admin


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+jwt", None])
def test_access_token_types_and_an_absent_typ_are_accepted(
    verifier: TokenVerifier, typ: Any
) -> None:
    header: dict[str, Any] = {"alg": "HS256"}
    if typ is not None:
        header["typ"] = typ
    assert verifier.verify(forge(header, payload(), SECRET.encode())).sub == "alice"


def test_issued_tokens_carry_whole_seconds_iat_rounded_down_and_exp_up(
        ring: KeyRing, clock: Any) -> None:
    clock.now = T0 + 0.5
    token, claims = TokenIssuer(ring, clock=clock).issue("alice", 60.25)
    payload = jwt.decode(token, options={"verify_signature": False})
    # Strict JWT libraries refuse a fractional NumericDate (RFC 7519 section 2).
    assert type(payload["iat"]) is int and type(payload["exp"]) is int
    assert (payload["iat"], payload["exp"]) == (T0, T0 + 61)
    assert (claims.iat, claims.exp) == (T0, T0 + 61)


def test_issuer_refuses_bad_user_names_and_ttls(ring: KeyRing) -> None:
    issuer = TokenIssuer(ring)
    with pytest.raises(InvalidInput, match="invalid user name"):
        issuer.issue("../etc", 60)
    with pytest.raises(InvalidInput, match="ttl"):
        issuer.issue("alice", 0)


def test_issuer_and_audience_are_written_and_required(ring: KeyRing, clock: Any) -> None:
    token, _ = TokenIssuer(ring, issuer="chatd", audience="chat", clock=clock).issue("alice", 60)
    assert TokenVerifier(ring, leeway=0, issuer="chatd", audience="chat", clock=clock).verify(token)


# --- the attack matrix -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_in_any_casing_is_refused(verifier: TokenVerifier, alg: str) -> None:
    assert refused(verifier, forge({"alg": alg, "typ": "JWT"}, payload())).reason == (
        "algorithm not allowed"
    )


@pytest.mark.parametrize("pair_name", ["rsa_pair", "ec_pair"])
def test_hs256_signed_with_the_public_key_as_secret_is_refused(
    request: pytest.FixtureRequest, make_config: Any, clock: Any, pair_name: str
) -> None:
    pair = request.getfixturevalue(pair_name)
    alg = "RS256" if pair_name == "rsa_pair" else "ES256"
    spec = KeySpec(kid="pub", alg=alg, public_key_file=str(pair.public_file))
    kidless = KeySpec(kid="", alg=alg, public_key_file=str(pair.public_file))
    for specs in ((spec,), (kidless,)):
        ring, _ = KeyRing.from_config(make_config(*specs, jwt_secret=SECRET))
        verifier = TokenVerifier(ring, leeway=0, clock=clock)
        header = {"alg": "HS256", "typ": "JWT", **({"kid": "pub"} if specs[0].kid else {})}
        token = forge(header, payload(), pair.public_pem)
        # With its kid: the key is bound to RS256/ES256. Without: only the default secret is
        # an HS256 key, and the public PEM is not that secret.
        expected = "algorithm not allowed" if specs[0].kid else "bad signature"
        assert refused(verifier, token).reason == expected


def test_a_key_bound_to_one_hmac_algorithm_refuses_another(make_config: Any, clock: Any) -> None:
    ring, _ = KeyRing.from_config(
        make_config(KeySpec(kid="h", alg="HS512", secret_env="K"), jwt_secret=SECRET),
        env={"K": "x" * 64},
    )
    verifier = TokenVerifier(ring, leeway=0, clock=clock)
    assert verifier.verify(sign(payload(), "x" * 64, "HS512", kid="h")).sub == "alice"
    token = sign(payload(), "x" * 64, "HS256", kid="h")
    assert refused(verifier, token).reason == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["HS384", "RS256", "PS256", "ES512", "XYZ"])
def test_an_algorithm_not_bound_to_any_key_is_refused(verifier: TokenVerifier, alg: str) -> None:
    token = forge({"alg": alg, "typ": "JWT"}, payload(), SECRET.encode())
    assert refused(verifier, token).reason == "algorithm not allowed"


def test_an_unknown_kid_is_refused(verifier: TokenVerifier) -> None:
    assert refused(verifier, sign(payload(), kid="nope")).reason == "unknown key"


@pytest.mark.parametrize(
    "kid", ["../../etc/passwd", "/dev/null", "keys/a", "a\\b", "", "x" * 200, "k\x00", 5, None]
)
def test_a_kid_with_path_characters_or_of_the_wrong_shape_is_an_unknown_key(
    verifier: TokenVerifier, tmp_path: Path, kid: Any
) -> None:
    (tmp_path / "state").mkdir(exist_ok=True)
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT", "kid": kid}
    token = forge(header, payload(), SECRET.encode())
    reason = refused(verifier, token).reason
    assert reason in ("unknown key", "malformed token")  # pyjwt refuses a non-string kid itself


def test_a_token_without_kid_is_refused_when_every_key_has_one(
    make_config: Any, clock: Any, tmp_path: Path
) -> None:
    ring = KeyRing(
        KeyRing.from_config(
            make_config(KeySpec(kid="a", alg="HS256", secret_env="K")), env={"K": SECRET}
        )[0].keys[:1],
        None,
    )
    verifier = TokenVerifier(ring, leeway=0, clock=clock)
    assert refused(verifier, sign(payload())).reason == "unknown key"
    assert verifier.verify(sign(payload(), kid="a")).sub == "alice"


@pytest.mark.parametrize("extra", ["jku", "x5u", "jwk"])
def test_jku_x5u_and_jwk_headers_are_ignored(
    make_config: Any, rsa_pair: Any, attacker_rsa_pair: Any, clock: Any, extra: str
) -> None:
    ring, _ = KeyRing.from_config(
        make_config(KeySpec(kid="r", alg="RS256", public_key_file=str(rsa_pair.public_file)))
    )
    verifier = TokenVerifier(ring, leeway=0, clock=clock)
    attacker = attacker_rsa_pair
    pointer: Any = "https://evil.example/keys.json"
    if extra == "jwk":
        pointer = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.private.public_key()))
    # Signed by the attacker, pointing at the attacker's key: never fetched, never trusted.
    for kid in ("r", None):
        headers = {extra: pointer, **({"kid": kid} if kid else {})}
        token = sign(payload(), attacker.private, "RS256", **headers)
        expected = "bad signature" if kid else "algorithm not allowed"
        assert refused(verifier, token).reason == expected
    # A genuine token that merely carries the header still verifies: it is ignored, not feared.
    genuine = sign(payload(), rsa_pair.private, "RS256", kid="r", **{extra: pointer})
    assert verifier.verify(genuine).sub == "alice"


def test_a_tampered_payload_is_a_bad_signature(verifier: TokenVerifier) -> None:
    header, _, sig = sign(payload()).split(".")
    tampered = f"{header}.{b64(json.dumps(payload(sub='mallory')).encode())}.{sig}"
    assert refused(verifier, tampered).reason == "bad signature"


def test_a_token_signed_with_another_secret_is_a_bad_signature(verifier: TokenVerifier) -> None:
    assert refused(verifier, sign(payload(), OTHER)).reason == "bad signature"


def test_an_expired_token_says_token_expired_with_its_own_http_code(
    verifier: TokenVerifier, clock: Any
) -> None:
    token = sign(payload(exp=T0 - 31))
    err = refused(verifier, token)
    assert (err.reason, err.http_code, int(err.code)) == ("token expired", "token_expired", 4401)


def test_expiry_within_the_leeway_is_accepted(verifier: TokenVerifier, clock: Any) -> None:
    token = sign(payload(exp=T0 + 10))
    clock.advance(39)
    assert verifier.verify(token).sub == "alice"
    clock.advance(1)
    assert refused(verifier, token).reason == "token expired"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("signature", "bad signature"),
        ("issuer", "wrong issuer"),
        ("nbf", "token not yet valid"),
        ("sub", "invalid user name"),
        ("jti", "missing claim jti"),
    ],
)
def test_expired_plus_another_fault_reports_the_other_fault_not_token_expired(
    ring: KeyRing, clock: Any, fault: str, reason: str
) -> None:
    verifier = TokenVerifier(ring, leeway=0, issuer="chatd", clock=clock)
    claims = payload(exp=T0 - 100, iss="chatd")
    key = SECRET
    if fault == "signature":
        key = OTHER
    elif fault == "issuer":
        claims["iss"] = "evil"
    elif fault == "nbf":
        claims["nbf"] = T0 + 1000
    elif fault == "sub":
        claims["sub"] = "bad name"
    else:
        del claims["jti"]
    err = refused(verifier, sign(claims, key))
    assert (err.reason, err.http_code) == (reason, "unauthorized")


def test_nbf_in_the_future_is_not_yet_valid(verifier: TokenVerifier, clock: Any) -> None:
    token = sign(payload(nbf=T0 + 60))
    assert refused(verifier, token).reason == "token not yet valid"
    clock.advance(31)  # within the 30 s leeway now
    assert verifier.verify(token).sub == "alice"


def test_iat_in_the_future_is_not_yet_valid(verifier: TokenVerifier) -> None:
    assert refused(verifier, sign(payload(iat=T0 + 120))).reason == "token not yet valid"


def test_wrong_issuer_and_audience_are_refused(ring: KeyRing, clock: Any) -> None:
    v = TokenVerifier(ring, leeway=0, issuer="chatd", audience="chat", clock=clock)
    ok = payload(iss="chatd", aud="chat")
    assert v.verify(sign(ok)).sub == "alice"
    assert v.verify(sign({**ok, "aud": ["other", "chat"]})).sub == "alice"
    assert refused(v, sign({**ok, "iss": "evil"})).reason == "wrong issuer"
    assert refused(v, sign({**ok, "aud": "other"})).reason == "wrong audience"
    assert refused(v, sign(payload(aud="chat"))).reason == "missing claim iss"
    assert refused(v, sign(payload(iss="chatd"))).reason == "missing claim aud"


def test_without_configured_issuer_iss_is_ignored_but_an_audience_is_refused(
    verifier: TokenVerifier,
) -> None:
    # RFC 7519 4.1.3: a recipient that does not identify itself with the aud value must reject.
    assert verifier.verify(sign(payload(iss="anyone"))).sub == "alice"
    assert refused(verifier, sign(payload(aud="someone"))).reason == "wrong audience"


@pytest.mark.parametrize("claim", ["sub", "exp", "iat", "jti"])
def test_a_missing_required_claim_is_named(verifier: TokenVerifier, claim: str) -> None:
    assert refused(verifier, sign(payload(**{claim: None}))).reason == f"missing claim {claim}"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "bad name"}, "invalid user name"),
        ({"sub": "../alice"}, "invalid user name"),
        ({"sub": 42}, "invalid user name"),
        ({"jti": 42}, "invalid claim jti"),
        ({"jti": "a b"}, "invalid claim jti"),
        ({"exp": "tomorrow"}, "invalid claim exp"),
        ({"exp": True}, "invalid claim exp"),
        ({"iat": "now"}, "invalid claim iat"),
        ({"nbf": "later"}, "invalid claim nbf"),
        ({"sid": 7}, "invalid claim sid"),
        ({"role": ["admin"]}, "invalid claim role"),
    ],
)
def test_malformed_claims_are_refused(
    verifier: TokenVerifier, claims: dict[str, Any], reason: str
) -> None:
    assert refused(verifier, sign(payload(**claims))).reason == reason


def test_an_infinite_expiry_is_refused(verifier: TokenVerifier) -> None:
    body = json.dumps(payload()).replace(str(T0 + 900), "Infinity")
    assert "Infinity" in body
    token = forge({"alg": "HS256", "typ": "JWT"}, body, SECRET.encode())
    assert refused(verifier, token).reason == "invalid claim exp"


@pytest.mark.parametrize("typ", ["refresh+jwt", "REFRESH+JWT", "JWE", "id+jwt", 3, ""])
def test_a_wrong_typ_and_a_refresh_typed_jwt_are_never_access_tokens(
    verifier: TokenVerifier, typ: Any
) -> None:
    token = forge({"alg": "HS256", "typ": typ}, payload(), SECRET.encode())
    assert refused(verifier, token).reason == "wrong token type"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "s_abcdef.0123456789abcdef0123456789",  # an opaque refresh token
        "x" * 9000,
        forge({"alg": "HS256"}, "[1, 2]", SECRET.encode()),  # payload not an object
        b64(b"[1]") + "." + b64(b"{}") + ".",  # header not an object
    ],
)
def test_malformed_tokens_are_refused(verifier: TokenVerifier, token: str) -> None:
    assert refused(verifier, token).reason == "malformed token"


def test_an_unsupported_critical_header_is_refused(verifier: TokenVerifier) -> None:
    token = forge({"alg": "HS256", "crit": ["exp-ext"], "exp-ext": 1}, payload(), SECRET.encode())
    assert refused(verifier, token).reason == "malformed token"


def test_a_non_string_token_is_malformed(verifier: TokenVerifier) -> None:
    with pytest.raises(AuthError, match="malformed token"):
        verifier.verify(None)  # type: ignore[arg-type]


# --- asymmetric keys from PEM files ------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair_name", "alg"), [("rsa_pair", "RS256"), ("ec_pair", "ES256"), ("ed_pair", "EdDSA")]
)
def test_asymmetric_keys_from_pem_files_sign_and_verify(
    request: pytest.FixtureRequest, make_config: Any, clock: Any, pair_name: str, alg: str
) -> None:
    pair = request.getfixturevalue(pair_name)
    spec = KeySpec(
        kid="k1",
        alg=alg,
        public_key_file=str(pair.public_file),
        private_key_file=str(pair.private_file),
        signing=True,
    )
    ring, _ = KeyRing.from_config(make_config(spec))
    assert ring.signer is not None and ring.signer.kid == "k1"
    token, _ = TokenIssuer(ring, clock=clock).issue("alice", 60)
    assert jwt.get_unverified_header(token) == {"alg": alg, "typ": "JWT", "kid": "k1"}
    # Verify-only: the public key alone, as an external issuer's key would be configured.
    public_only, _ = KeyRing.from_config(
        make_config(KeySpec(kid="k1", alg=alg, public_key_file=str(pair.public_file)))
    )
    assert TokenVerifier(public_only, leeway=0, clock=clock).verify(token).sub == "alice"
    # Signed by the external issuer directly.
    external = sign(payload(), pair.private, alg, kid="k1")
    assert TokenVerifier(public_only, leeway=0, clock=clock).verify(external).sub == "alice"


def test_an_es256_token_signed_by_another_ec_key_is_a_bad_signature(
    make_config: Any, ec_pair: Any, clock: Any
) -> None:
    ring, _ = KeyRing.from_config(
        make_config(KeySpec(kid="e", alg="ES256", public_key_file=str(ec_pair.public_file)))
    )
    other = ec.generate_private_key(ec.SECP256R1())
    token = sign(payload(), other, "ES256", kid="e")
    assert refused(TokenVerifier(ring, leeway=0, clock=clock), token).reason == "bad signature"


# --- key rotation -------------------------------------------------------------------------------


def test_key_rotation_add_the_new_key_switch_the_signer_remove_the_old_key(
    make_config: Any, clock: Any
) -> None:
    env = {"OLD": "o" * 32, "NEW": "n" * 32}
    old = KeySpec(kid="2025-01", alg="HS256", secret_env="OLD", signing=True)
    ring1, _ = KeyRing.from_config(make_config(old), env=env)
    issuer = TokenIssuer(ring1, clock=clock)
    verifier = TokenVerifier(ring1, leeway=0, clock=clock)
    token1, _ = issuer.issue("alice", 900)
    assert jwt.get_unverified_header(token1)["kid"] == "2025-01"

    # Step 1 and 2: the new key is added and becomes the signer; old tokens still verify.
    ring2, _ = KeyRing.from_config(
        make_config(
            KeySpec(kid="2025-01", alg="HS256", secret_env="OLD"),
            KeySpec(kid="2025-06", alg="HS256", secret_env="NEW", signing=True),
        ),
        env=env,
    )
    issuer.keyring = verifier.keyring = ring2
    token2, _ = issuer.issue("alice", 900)
    assert jwt.get_unverified_header(token2)["kid"] == "2025-06"
    assert verifier.verify(token1).sub == verifier.verify(token2).sub == "alice"

    # Step 3: the old key is removed once its tokens have expired.
    ring3, _ = KeyRing.from_config(
        make_config(KeySpec(kid="2025-06", alg="HS256", secret_env="NEW", signing=True)), env=env
    )
    verifier.keyring = ring3
    assert verifier.verify(token2).sub == "alice"
    assert refused(verifier, token1).reason == "unknown key"


def test_two_keys_without_kid_are_both_tried(make_config: Any, clock: Any) -> None:
    ring, _ = KeyRing.from_config(
        make_config(KeySpec(kid="", alg="HS256", secret_env="K"), jwt_secret=SECRET),
        env={"K": OTHER},
    )
    verifier = TokenVerifier(ring, leeway=0, clock=clock)
    assert verifier.verify(sign(payload(), SECRET)).sub == "alice"
    assert verifier.verify(sign(payload(), OTHER)).sub == "alice"
    assert refused(verifier, sign(payload(), "z" * 40)).reason == "bad signature"


def test_leeway_over_300_seconds_is_refused(ring: KeyRing) -> None:
    with pytest.raises(InvalidInput):
        TokenVerifier(ring, leeway=301)


def test_hmac_of_the_header_alone_is_not_a_valid_signature(verifier: TokenVerifier) -> None:
    # A sanity check on forge(): the same construction with the right secret does verify.
    good = forge({"alg": "HS256", "typ": "JWT"}, payload(), SECRET.encode())
    assert verifier.verify(good).sub == "alice"
    digest = hashlib.sha256(good.encode()).digest()
    assert refused(verifier, good.rsplit(".", 1)[0] + "." + b64(digest)).reason == "bad signature"
