#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into seeds/<target>/ (needs python3-cryptography).

Seeds are valid inputs for the fixed keys of each target, so the fuzzer starts deep inside the
parsers instead of at "not three segments". Run from crates/token/fuzz: python3 make_seeds.py
"""
import base64, hashlib, hmac, json, os, struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def write(target, name, data):
    folder = os.path.join(os.path.dirname(__file__), "seeds", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def token(alg, kid, sign, claims=None):
    claims = claims or {"iss": "https://issuer.test", "sub": "user-1", "aud": "shop",
                        "exp": 1_700_000_300, "nbf": 1_700_000_000, "iat": 1_700_000_000,
                        "jti": "seed-jti", "role": "admin"}
    header = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    message = f"{header}.{payload}".encode()
    return f"{header}.{payload}.{b64(sign(message))}"


def es256(message):
    der = key("test-only-es256-private.pem").sign(message, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


signers = {
    ("EdDSA", "ed"): lambda m: key("test-only-eddsa-private.pem").sign(m),
    ("ES256", "es"): es256,
    ("RS256", "rs"): lambda m: key("test-only-rs256-private.pem").sign(
        m, padding.PKCS1v15(), hashes.SHA256()),
    ("HS256", "hs"): lambda m: hmac.new(b"fuzz-only-secret-0123456789abcdef", m,
                                        hashlib.sha256).digest(),
}
for (alg, kid), sign in signers.items():
    write("verify_token", f"valid-{kid}", token(alg, kid, sign))
write("verify_token", "alg-none", token("none", "ed", lambda m: b""))
write("verify_token", "hs-on-rsa-kid", token("HS256", "rs", signers[("HS256", "hs")]))
write("verify_token", "expired-hs", token("HS256", "hs", signers[("HS256", "hs")], {
    "iss": "https://issuer.test", "sub": "u", "aud": ["shop", "x"], "exp": 1, "iat": 0,
    "jti": "j"}))

# Cookies sealed with key id 1 = [1; 32], name "cart" as AAD, expiring in 2100.
for i, state in enumerate([b"", b'{"items":[["apple",2]]}', b"x" * 200]):
    nonce = bytes(range(24))
    plaintext = struct.pack(">Q", 4_102_444_800) + state
    # XChaCha20-Poly1305 = HChaCha20 subkey + ChaCha20-Poly1305; python's cryptography lacks
    # XChaCha, so these seeds carry a correct layout but will not open. Still useful structure.
    sealed = ChaCha20Poly1305(bytes([1] * 32)).encrypt(nonce[12:], plaintext, b"cart")
    value = b64(bytes([1]) + nonce + sealed)
    write("open_sealed_cookie", f"layout-{i}", value)
    write("open_sealed_cookie", f"header-{i}", f"theme=dark; cart={value}; x=1")

family = b64(bytes(range(16)))
secret = b64(bytes(range(32)))
write("refresh_token", "shape", f"{family}.0.{secret}")
write("refresh_token", "big-generation", f"{family}.18446744073709551615.{secret}")

ring_jwks = {
    "okp": {"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(32)), "kid": "k", "alg": "EdDSA"},
    "ec": {"kty": "EC", "crv": "P-256", "kid": "k",
           "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
           "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
    "rsa": {"kty": "RSA", "kid": "k", "e": "AQAB", "alg": "RS256",
            "n": b64(key("test-only-rs256-private.pem").public_key().public_numbers().n
                     .to_bytes(256, "big"))},
    "oct": {"kty": "oct", "kid": "k", "k": b64(b"s" * 32)},
}
for name, jwk in ring_jwks.items():
    write("jwks_key", name, json.dumps(jwk))
print("seeds written")
