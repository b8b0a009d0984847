//! Access tokens: issue and verify with every algorithm, and every rejection the issue asks for,
//! each with the typed error it must produce.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use common::*;
use statehouse_token::{
    IssueError, IssuerConfig, Key, KeyError, KeyRing, ManualClock, SigningAlg, TokenError,
    TokenIssuer, TokenVerifier, VerifierConfig,
};

fn issuer(ring: &KeyRing) -> TokenIssuer {
    TokenIssuer::new(ring.clone(), IssuerConfig::new(ISS, AUD)).unwrap()
}

fn verifier(ring: &KeyRing) -> TokenVerifier {
    TokenVerifier::new(ring.clone(), VerifierConfig::new(ISS, AUD))
}

fn extra(json: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    json.as_object().unwrap().clone()
}

#[tokio::test]
async fn every_algorithm_issues_and_verifies() {
    let keys = [
        Key::generate_ed25519("ed").unwrap(),
        Key::from_private_pem(
            "ed-pem",
            SigningAlg::EdDSA,
            &fixture("test-only-eddsa-private.pem"),
        )
        .unwrap(),
        es_key("es"),
        rsa_key("rs"),
        hs_key("hs"),
    ];
    for key in keys {
        let alg = key.alg();
        let ring = ring_of(vec![key]);
        let (token, claims) = issuer(&ring)
            .issue_access("user-7", extra(serde_json::json!({"role": "admin"})))
            .unwrap();
        let verified = verifier(&ring).verify(&token).await.unwrap();
        assert_eq!(verified, claims, "{alg}");
        assert_eq!(verified.sub, "user-7");
        assert_eq!(verified.extra["role"], "admin");
        assert_eq!(
            verified.exp - verified.iat,
            300,
            "default lifetime is 5 minutes"
        );
        assert_eq!(verified.jti.len(), 22, "128-bit random jti");
        let header: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                token.split('.').next().unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], alg.name());
    }
}

#[tokio::test]
async fn eddsa_is_what_the_dev_ring_signs_with_and_jtis_differ() {
    let ring = KeyRing::generate_ed25519("dev").unwrap();
    let issuer = issuer(&ring);
    let (_, a) = issuer.issue_access("u", Default::default()).unwrap();
    let (_, b) = issuer.issue_access("u", Default::default()).unwrap();
    assert_eq!(ring.signing_key().unwrap().alg(), SigningAlg::EdDSA);
    assert_ne!(a.jti, b.jti);
}

#[tokio::test]
async fn alg_none_is_rejected_with_or_without_a_signature() {
    let ring = KeyRing::generate_ed25519("k1").unwrap();
    let v = verifier(&ring);
    let claims = good_claims().to_string();
    for header in [
        r#"{"alg":"none","kid":"k1"}"#,
        r#"{"alg":"none"}"#,
        r#"{"alg":"None","kid":"k1"}"#,
        r#"{"alg":"NONE","kid":"k1","typ":"JWT"}"#,
    ] {
        // The classic unsigned form: an empty third segment.
        let unsigned = forge(header, &claims, |_| Vec::new());
        assert!(unsigned.ends_with('.'));
        let err = v.verify_at(&unsigned, T0).await.unwrap_err();
        assert!(
            matches!(err, TokenError::AlgorithmMismatch),
            "{header}: {err:?}"
        );
        let with_junk_signature = forge(header, &claims, |_| b"sig".to_vec());
        let err = v.verify_at(&with_junk_signature, T0).await.unwrap_err();
        assert!(
            matches!(err, TokenError::AlgorithmMismatch),
            "{header}: {err:?}"
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    // The classic confusion: the attacker knows the RSA public key (it is in the JWKS) and
    // HMAC-signs a token with its PEM bytes as the secret, naming the RSA key's kid.
    let ring = ring_of(vec![rsa_key("rsa-1")]);
    let public_pem = fixture("test-only-rs256-public.pem");
    let forged = forge(
        r#"{"alg":"HS256","kid":"rsa-1","typ":"JWT"}"#,
        &good_claims().to_string(),
        hmac_sha256(&public_pem),
    );
    let err = verifier(&ring).verify_at(&forged, T0).await.unwrap_err();
    assert!(matches!(err, TokenError::AlgorithmMismatch), "{err:?}");

    // The same with the DER bytes of the public key and with the JWK's modulus.
    let jwk = ring.jwks()["keys"][0].clone();
    for secret in [
        jwk["n"].as_str().unwrap().as_bytes().to_vec(),
        jwk.to_string().into_bytes(),
    ] {
        let forged = forge(
            r#"{"alg":"HS256","kid":"rsa-1"}"#,
            &good_claims().to_string(),
            hmac_sha256(&secret),
        );
        let err = verifier(&ring).verify_at(&forged, T0).await.unwrap_err();
        assert!(matches!(err, TokenError::AlgorithmMismatch), "{err:?}");
    }
}

#[tokio::test]
async fn a_token_cannot_pick_another_algorithm_for_a_key() {
    let ring = ring_of(vec![
        Key::generate_ed25519("ed").unwrap(),
        es_key("es"),
        rsa_key("rs"),
        hs_key("hs"),
    ]);
    // Name each key's kid with every other algorithm (signed with anything at all).
    for kid in ["ed", "es", "rs", "hs"] {
        for alg in [
            "EdDSA", "ES256", "RS256", "HS256", "ES384", "RS512", "PS256", "HS512",
        ] {
            if alg == ring.get(kid).unwrap().alg().name() {
                continue;
            }
            let header = format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#);
            let token = forge(
                &header,
                &good_claims().to_string(),
                hmac_sha256(b"whatever"),
            );
            let err = verifier(&ring).verify_at(&token, T0).await.unwrap_err();
            assert!(
                matches!(err, TokenError::AlgorithmMismatch),
                "{kid}/{alg}: {err:?}"
            );
        }
    }
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_rejected() {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let (token, _) = issuer(&ring).issue_access("u", Default::default()).unwrap();

    let other_iss = TokenVerifier::new(ring.clone(), VerifierConfig::new("https://evil.test", AUD));
    assert!(matches!(
        other_iss.verify(&token).await,
        Err(TokenError::WrongIssuer)
    ));
    let other_aud = TokenVerifier::new(ring.clone(), VerifierConfig::new(ISS, "billing"));
    assert!(matches!(
        other_aud.verify(&token).await,
        Err(TokenError::WrongAudience)
    ));

    // A verifier accepting several audiences takes a token for any one of them.
    let mut multi = VerifierConfig::new(ISS, "billing");
    multi.audience.push(AUD.into());
    assert!(
        TokenVerifier::new(ring.clone(), multi)
            .verify(&token)
            .await
            .is_ok()
    );

    // A token for several audiences, one of them ours.
    let mut config = IssuerConfig::new(ISS, "billing");
    config.audience.push(AUD.into());
    let (token, _) = TokenIssuer::new(ring.clone(), config)
        .unwrap()
        .issue_access("u", Default::default())
        .unwrap();
    assert!(verifier(&ring).verify(&token).await.is_ok());
    assert!(matches!(
        other_aud.verify(&token).await,
        Ok(c) if c.aud == ["billing", AUD]
    ));
}

#[tokio::test]
async fn expiry_and_not_before_honour_the_leeway_exactly() {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let issuer = issuer(&ring);
    let v = verifier(&ring); // leeway 30 s
    let (token, claims) = issuer.issue_access_at("u", Default::default(), T0).unwrap();
    assert_eq!(claims.exp, T0 + 300);

    assert!(
        v.verify_at(&token, T0 + 300).await.is_ok(),
        "at exp, within leeway"
    );
    assert!(
        v.verify_at(&token, T0 + 329).await.is_ok(),
        "last second of leeway"
    );
    assert!(matches!(
        v.verify_at(&token, T0 + 330).await,
        Err(TokenError::Expired)
    ));
    assert!(matches!(
        v.verify_at(&token, T0 + 100_000).await,
        Err(TokenError::Expired)
    ));

    assert!(
        v.verify_at(&token, T0 - 30).await.is_ok(),
        "clock 30 s behind"
    );
    assert!(matches!(
        v.verify_at(&token, T0 - 31).await,
        Err(TokenError::NotYetValid)
    ));

    // Leeway is configurable; with none, exp is exact.
    let strict = TokenVerifier::new(
        ring.clone(),
        VerifierConfig::new(ISS, AUD).leeway(Duration::ZERO),
    );
    assert!(strict.verify_at(&token, T0 + 299).await.is_ok());
    assert!(matches!(
        strict.verify_at(&token, T0 + 300).await,
        Err(TokenError::Expired)
    ));
    assert!(matches!(
        strict.verify_at(&token, T0 - 1).await,
        Err(TokenError::NotYetValid)
    ));
}

#[tokio::test]
async fn an_issued_at_in_the_future_is_not_yet_valid() {
    let ring = ring_of(vec![hs_key("hs")]);
    let secret = b"0123456789abcdef0123456789abcdef-test-only";
    let mut claims = good_claims();
    claims.as_object_mut().unwrap().remove("nbf");
    claims["iat"] = (T0 + 3600).into();
    claims["exp"] = (T0 + 7200).into();
    let token = forge(
        r#"{"alg":"HS256","kid":"hs"}"#,
        &claims.to_string(),
        hmac_sha256(secret),
    );
    assert!(matches!(
        verifier(&ring).verify_at(&token, T0).await,
        Err(TokenError::NotYetValid)
    ));
}

#[tokio::test]
async fn time_comes_from_the_injected_clock() {
    let manual = ManualClock::at_unix_secs(T0);
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let issuer = issuer(&ring).with_clock(manual.clock());
    let v = verifier(&ring).with_clock(manual.clock());
    let (token, claims) = issuer.issue_access("u", Default::default()).unwrap();
    assert_eq!(claims.iat, T0);
    manual.advance(Duration::from_secs(329));
    assert!(v.verify(&token).await.is_ok());
    manual.advance(Duration::from_secs(1));
    assert!(matches!(v.verify(&token).await, Err(TokenError::Expired)));
}

#[tokio::test]
async fn unknown_kid_is_rejected() {
    let ring = KeyRing::generate_ed25519("known").unwrap();
    let other = KeyRing::generate_ed25519("other").unwrap();
    let (token, _) = issuer(&other)
        .issue_access("u", Default::default())
        .unwrap();
    assert!(matches!(
        verifier(&ring).verify(&token).await,
        Err(TokenError::UnknownKid)
    ));
}

#[tokio::test]
async fn a_signature_by_another_key_with_our_kid_is_rejected() {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let impostor = KeyRing::generate_ed25519("k").unwrap();
    let (token, _) = issuer(&impostor)
        .issue_access("u", Default::default())
        .unwrap();
    assert!(matches!(
        verifier(&ring).verify(&token).await,
        Err(TokenError::BadSignature)
    ));

    // Same for HS256 with a different secret, and for a payload edited after signing.
    let hs = ring_of(vec![hs_key("hs")]);
    let forged = forge(
        r#"{"alg":"HS256","kid":"hs"}"#,
        &good_claims().to_string(),
        hmac_sha256(b"a different secret of enough length!!"),
    );
    assert!(matches!(
        verifier(&hs).verify_at(&forged, T0).await,
        Err(TokenError::BadSignature)
    ));

    let (token, _) = issuer(&ring)
        .issue_access("alice", Default::default())
        .unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let payload = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, parts[1])
            .unwrap(),
    )
    .unwrap()
    .replace("alice", "admin");
    let edited = format!("{}.{}.{}", parts[0], b64(payload.as_bytes()), parts[2]);
    assert!(matches!(
        verifier(&ring).verify(&edited).await,
        Err(TokenError::BadSignature)
    ));
    // An empty signature on an otherwise good token.
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    assert!(matches!(
        verifier(&ring).verify(&stripped).await,
        Err(TokenError::BadSignature)
    ));
}

#[tokio::test]
async fn malformed_segments_are_rejected() {
    let ring = ring_of(vec![hs_key("hs")]);
    let secret = b"0123456789abcdef0123456789abcdef-test-only";
    let v = verifier(&ring);
    let (good, _) = issuer(&ring).issue_access("u", Default::default()).unwrap();
    let header = r#"{"alg":"HS256","kid":"hs"}"#;
    let mut missing_jti = good_claims();
    missing_jti.as_object_mut().unwrap().remove("jti");
    let mut missing_exp = good_claims();
    missing_exp.as_object_mut().unwrap().remove("exp");
    let mut float_exp = good_claims();
    float_exp["exp"] = serde_json::json!("soon");
    let mut empty_sub = good_claims();
    empty_sub["sub"] = "".into();

    let cases: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("one segment", "abc".into()),
        ("two segments", "abc.def".into()),
        ("four segments", format!("{good}.abc")),
        (
            "empty header",
            format!(".{}", good.split_once('.').unwrap().1),
        ),
        ("padding", good.replacen('.', "=.", 1)),
        ("whitespace", format!(" {good}")),
        (
            "standard alphabet",
            format!("{}+.{}", b64(header.as_bytes()), "e30.c2ln"),
        ),
        ("non-ascii", format!("{good}é")),
        ("header not json", format!("{}.e30.c2ln", b64(b"not json"))),
        ("header not object", format!("{}.e30.c2ln", b64(b"[1,2]"))),
        (
            "header without alg",
            format!("{}.e30.c2ln", b64(br#"{"kid":"hs"}"#)),
        ),
        (
            "header without kid",
            format!("{}.e30.c2ln", b64(br#"{"alg":"HS256"}"#)),
        ),
        (
            "alg not a string",
            format!("{}.e30.c2ln", b64(br#"{"alg":256,"kid":"hs"}"#)),
        ),
        (
            "crit",
            format!(
                "{}.e30.c2ln",
                b64(br#"{"alg":"HS256","kid":"hs","crit":["exp"]}"#)
            ),
        ),
        (
            "too long",
            format!("{}.{}.c2ln", b64(header.as_bytes()), "A".repeat(9000)),
        ),
        (
            "payload not json (signed)",
            forge(header, "not json", hmac_sha256(secret)),
        ),
        (
            "payload not object (signed)",
            forge(header, "42", hmac_sha256(secret)),
        ),
        (
            "missing jti (signed)",
            forge(header, &missing_jti.to_string(), hmac_sha256(secret)),
        ),
        (
            "missing exp (signed)",
            forge(header, &missing_exp.to_string(), hmac_sha256(secret)),
        ),
        (
            "exp not a number (signed)",
            forge(header, &float_exp.to_string(), hmac_sha256(secret)),
        ),
        (
            "empty sub (signed)",
            forge(header, &empty_sub.to_string(), hmac_sha256(secret)),
        ),
    ];
    for (what, token) in cases {
        let err = v.verify_at(&token, T0).await.unwrap_err();
        assert!(matches!(err, TokenError::Malformed(_)), "{what}: {err:?}");
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
}

#[tokio::test]
async fn mutated_tokens_never_panic_and_never_verify() {
    // A deterministic, in-suite cousin of the fuzz target: flip, drop and insert bytes of a
    // valid token of each algorithm. Every mutant must be rejected with a typed error.
    let ring = ring_of(vec![
        Key::generate_ed25519("ed").unwrap(),
        es_key("es"),
        rsa_key("rs"),
    ]);
    let v = verifier(&ring);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for kid in ["ed", "es", "rs"] {
        let signer = TokenIssuer::new(
            KeyRing::new()
                .with_key(match kid {
                    "ed" => Key::generate_ed25519("ed").unwrap(),
                    "es" => es_key("es"),
                    _ => rsa_key("rs"),
                })
                .unwrap(),
            IssuerConfig::new(ISS, AUD),
        )
        .unwrap();
        let (token, _) = signer.issue_access("u", Default::default()).unwrap();
        let token = token.into_bytes();
        for _ in 0..300 {
            let mut m = token.clone();
            let at = (next() as usize) % m.len();
            match next() % 4 {
                0 => m[at] ^= 1 << (next() % 8),
                1 => {
                    m.remove(at);
                }
                2 => m.insert(at, (next() % 256) as u8),
                _ => m.truncate(at),
            }
            let Ok(text) = String::from_utf8(m.clone()) else {
                continue;
            };
            if text.as_bytes() == token.as_slice() {
                continue;
            }
            // A flipped low bit in the last base64 character of a segment can decode to the
            // same bytes only when trailing bits are ignored; jsonwebtoken rejects those, so
            // every mutant fails.
            let result = v.verify(&text).await;
            assert!(result.is_err(), "{kid}: mutant verified: {text}");
        }
    }
}

#[tokio::test]
async fn rejections_map_to_401_and_store_outage_to_503() {
    let store_down = TokenError::Unavailable(statehouse_store::StoreError::Unavailable {
        store: "redis://127.0.0.1:1".into(),
        kind: statehouse_store::UnavailableKind::Connection,
        detail: "refused".into(),
    });
    let response = store_down.into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");

    let response = TokenError::KeysUnavailable("down".into()).into_response();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);

    for err in [
        TokenError::Malformed("x"),
        TokenError::UnknownKid,
        TokenError::AlgorithmMismatch,
        TokenError::BadSignature,
        TokenError::Expired,
        TokenError::NotYetValid,
        TokenError::WrongIssuer,
        TokenError::WrongAudience,
        TokenError::Revoked,
    ] {
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{challenge}"
        );
    }
}

#[tokio::test]
async fn newest_signing_key_signs_and_older_keys_still_verify() {
    let old = KeyRing::generate_ed25519("2025-01").unwrap();
    let (old_token, _) = issuer(&old).issue_access("u", Default::default()).unwrap();

    // Rotation: the new key is added last and signs; the old one stays to verify.
    let rotated = old.clone().with_key(es_key("2025-07")).unwrap();
    assert_eq!(rotated.signing_key().unwrap().kid(), "2025-07");
    let (new_token, _) = issuer(&rotated)
        .issue_access("u", Default::default())
        .unwrap();
    assert!(verifier(&rotated).verify(&old_token).await.is_ok());
    assert!(verifier(&rotated).verify(&new_token).await.is_ok());
    assert!(matches!(
        verifier(&old).verify(&new_token).await,
        Err(TokenError::UnknownKid)
    ));

    // Retiring the old key: its tokens stop verifying.
    let retired = rotated.without("2025-01");
    assert!(matches!(
        verifier(&retired).verify(&old_token).await,
        Err(TokenError::UnknownKid)
    ));

    // A verify-only key added last does not take over signing.
    let staged = retired
        .with_key(
            Key::from_public_pem(
                "2026-01",
                SigningAlg::RS256,
                &fixture("test-only-rs256-public.pem"),
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(staged.signing_key().unwrap().kid(), "2025-07");

    // Duplicate kids are refused.
    assert!(matches!(
        staged.with_key(hs_key("2025-07")),
        Err(KeyError::DuplicateKid(_))
    ));
}

#[test]
fn issuing_refuses_reserved_claims_an_empty_subject_and_a_verify_only_ring() {
    let ring = KeyRing::generate_ed25519("k").unwrap();
    let issuer = issuer(&ring);
    for reserved in ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"] {
        let extra = extra(serde_json::json!({ reserved: "x" }));
        assert!(matches!(
            issuer.issue_access("u", extra),
            Err(IssueError::ReservedClaim(c)) if c == reserved
        ));
    }
    assert!(matches!(
        issuer.issue_access("", Default::default()),
        Err(IssueError::EmptySubject)
    ));
    let public_only = ring_of(vec![
        Key::from_public_pem(
            "p",
            SigningAlg::ES256,
            &fixture("test-only-es256-public.pem"),
        )
        .unwrap(),
    ]);
    assert!(matches!(
        TokenIssuer::new(public_only, IssuerConfig::new(ISS, AUD)),
        Err(IssueError::NoSigningKey)
    ));
}

#[tokio::test]
async fn public_pem_keys_verify_tokens_of_their_private_halves() {
    for (alg, private, public) in [
        (
            SigningAlg::EdDSA,
            "test-only-eddsa-private.pem",
            "test-only-eddsa-public.pem",
        ),
        (
            SigningAlg::ES256,
            "test-only-es256-private.pem",
            "test-only-es256-public.pem",
        ),
        (
            SigningAlg::RS256,
            "test-only-rs256-private.pem",
            "test-only-rs256-public.pem",
        ),
    ] {
        let signer = ring_of(vec![
            Key::from_private_pem("k", alg, &fixture(private)).unwrap(),
        ]);
        let checker = ring_of(vec![
            Key::from_public_pem("k", alg, &fixture(public)).unwrap(),
        ]);
        let (token, _) = issuer(&signer)
            .issue_access("u", Default::default())
            .unwrap();
        assert!(verifier(&checker).verify(&token).await.is_ok(), "{alg}");
        // The JWKS of either half is the same public key.
        assert_eq!(signer.jwks(), checker.jwks(), "{alg}");
    }
}

#[test]
fn unfit_keys_are_refused_at_load_time() {
    let err = |r: Result<Key, KeyError>| r.unwrap_err().to_string();
    // A P-384 key is not an ES256 key.
    let e = err(Key::from_private_pem(
        "k",
        SigningAlg::ES256,
        &fixture("test-only-p384-private.pem"),
    ));
    assert!(e.contains("\"k\""), "{e}");
    // RSA under 2048 bits.
    let e = err(Key::from_private_pem(
        "k",
        SigningAlg::RS256,
        &fixture("test-only-rsa1024-private.pem"),
    ));
    assert!(e.contains("2048"), "{e}");
    // A key of one type under another algorithm.
    assert!(
        Key::from_private_pem(
            "k",
            SigningAlg::EdDSA,
            &fixture("test-only-rs256-private.pem")
        )
        .is_err()
    );
    assert!(
        Key::from_private_pem(
            "k",
            SigningAlg::RS256,
            &fixture("test-only-es256-private.pem")
        )
        .is_err()
    );
    assert!(
        Key::from_private_pem(
            "k",
            SigningAlg::HS256,
            &fixture("test-only-es256-private.pem")
        )
        .is_err()
    );
    // A public key where a private one is expected, and garbage.
    assert!(
        Key::from_private_pem(
            "k",
            SigningAlg::ES256,
            &fixture("test-only-es256-public.pem")
        )
        .is_err()
    );
    assert!(
        Key::from_private_pem(
            "k",
            SigningAlg::ES256,
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        )
        .is_err()
    );
    // Short HMAC secrets.
    assert!(matches!(
        Key::hmac("k", &[7u8; 31]),
        Err(KeyError::WeakSecret { len: 31, .. })
    ));
    assert!(Key::hmac("k", &[7u8; 32]).is_ok());
    // Bad key ids.
    assert!(matches!(
        Key::generate_ed25519("a b"),
        Err(KeyError::InvalidKid(_))
    ));
}

#[test]
fn the_jwks_holds_public_keys_only() {
    let ring = ring_of(vec![
        Key::generate_ed25519("ed").unwrap(),
        es_key("es"),
        rsa_key("rs"),
        hs_key("hs"),
    ]);
    let jwks = ring.jwks();
    let keys = jwks["keys"].as_array().unwrap();
    let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, ["ed", "es", "rs"], "no HS256 secret");
    for key in keys {
        assert_eq!(key["use"], "sig");
        assert!(key["alg"].is_string());
        // Private JWK members (RFC 7518 §6.2.2, §6.3.2; RFC 8037 §2) and symmetric keys.
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            assert!(key.get(private).is_none(), "{} has {private}", key["kid"]);
        }
    }
    assert_eq!(keys[0]["kty"], "OKP");
    assert_eq!(keys[0]["crv"], "Ed25519");
    assert_eq!(keys[1]["kty"], "EC");
    assert_eq!(keys[1]["crv"], "P-256");
    assert_eq!(keys[2]["kty"], "RSA");
    assert!(
        !jwks.to_string().contains("0123456789abcdef"),
        "HMAC secret leaked"
    );
}

#[tokio::test]
async fn key_rings_load_from_a_spec_of_files_and_env_vars() {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let env = |name: &str| match name {
        "HS_SECRET" => Some("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n".to_owned()),
        "ES_PEM" => Some(String::from_utf8(fixture("test-only-es256-private.pem")).unwrap()),
        _ => None,
    };
    let spec = format!(
        "old:RS256:file:{dir}/test-only-rs256-public.pem, hs:HS256:env:HS_SECRET\n\
         ed:EdDSA:file:{dir}/test-only-eddsa-private.pem es:ES256:env:ES_PEM"
    );
    let ring = KeyRing::from_spec(&spec, env).unwrap();
    let summary: Vec<(&str, SigningAlg, bool)> = ring
        .keys()
        .map(|k| (k.kid(), k.alg(), k.can_sign()))
        .collect();
    assert_eq!(
        summary,
        [
            ("old", SigningAlg::RS256, false),
            ("hs", SigningAlg::HS256, true),
            ("ed", SigningAlg::EdDSA, true),
            ("es", SigningAlg::ES256, true),
        ]
    );
    assert_eq!(
        ring.signing_key().unwrap().kid(),
        "es",
        "the last entry signs"
    );
    let (token, _) = issuer(&ring).issue_access("u", Default::default()).unwrap();
    assert!(verifier(&ring).verify(&token).await.is_ok());

    // Errors name the entry and the cause, never secret material.
    for (spec, needle) in [
        ("", "names no key"),
        ("k:EdDSA", "expected KID:ALG"),
        ("k:none:env:X", "not supported"),
        ("k:EdDSA:http:x", "file:PATH or env:VAR"),
        ("k:HS256:env:MISSING", "MISSING"),
        ("k:EdDSA:file:/nonexistent/key.pem", "/nonexistent/key.pem"),
        ("k:HS256:env:SHORT", "at least 32"),
        ("k:HS256:env:HS_SECRET k:HS256:env:HS_SECRET", "twice"),
    ] {
        let env = |name: &str| match name {
            "HS_SECRET" => Some("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_owned()),
            "SHORT" => Some("c2hvcnQ=".to_owned()),
            _ => None,
        };
        let e = KeyRing::from_spec(spec, env).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec:?}: {e}");
        assert!(!e.contains("MDEyMzQ1"), "secret in error: {e}");
    }
    assert!(matches!(
        KeyRing::from_env("STATEHOUSE_TOKEN_TEST_SURELY_UNSET"),
        Err(KeyError::MissingEnv(_))
    ));
}

#[test]
fn debug_output_holds_no_key_material() {
    let ring = ring_of(vec![hs_key("hs"), rsa_key("rs")]);
    let debug = format!("{ring:?}");
    assert!(
        debug.contains("\"hs\"") && debug.contains("RS256"),
        "{debug}"
    );
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
    assert!(!debug.contains("MII"), "{debug}");
}

#[tokio::test]
async fn tokens_signed_by_an_independent_implementation_verify() {
    // The seeds of the `verify_token` fuzz target were signed by Python's `cryptography`
    // (OpenSSL) with the fixture keys (fuzz/make_seeds.py): an interoperability check for each
    // algorithm, and for the rejections among them.
    let ring = ring_of(vec![
        Key::from_private_pem(
            "ed",
            SigningAlg::EdDSA,
            &fixture("test-only-eddsa-private.pem"),
        )
        .unwrap(),
        es_key("es"),
        rsa_key("rs"),
        Key::hmac("hs", b"fuzz-only-secret-0123456789abcdef").unwrap(),
    ]);
    let v = TokenVerifier::new(ring, VerifierConfig::new("https://issuer.test", "shop"));
    let seed = |name: &str| {
        let path = format!(
            "{}/fuzz/seeds/verify_token/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
    };
    for name in ["valid-ed", "valid-es", "valid-rs", "valid-hs"] {
        let claims = v.verify_at(&seed(name), T0 + 100).await.unwrap();
        assert_eq!(
            (claims.sub.as_str(), &claims.extra["role"]),
            ("user-1", &serde_json::json!("admin")),
            "{name}"
        );
    }
    for (name, expected) in [
        ("alg-none", "AlgorithmMismatch"),
        ("hs-on-rsa-kid", "AlgorithmMismatch"),
        ("expired-hs", "Expired"),
    ] {
        let err = v.verify_at(&seed(name), T0 + 100).await.unwrap_err();
        assert_eq!(format!("{err:?}"), expected, "{name}");
    }
}

#[tokio::test]
async fn regression_short_ed25519_jwk_is_refused_not_a_panic() {
    // jsonwebtoken 11.1's EdDSA verifier takes `key[..32]` and panics on a shorter key. A JWKS is
    // network input, so an Ed25519 `x` of any length but 32 bytes is refused when the key is
    // loaded. (The `jwks_key` fuzz target found the panic within seconds with this check off.)
    let ring = KeyRing::generate_ed25519("ed").unwrap();
    let (token, _) = issuer(&ring).issue_access("u", Default::default()).unwrap();
    for len in [0usize, 1, 24, 31, 33, 64] {
        let mut jwk = ring.jwks()["keys"][0].clone();
        jwk["x"] = b64(&vec![7u8; len]).into();
        let err = Key::from_jwk(&jwk).unwrap_err();
        assert!(err.to_string().contains("Ed25519 x"), "{len}: {err}");
    }
    // The untouched JWK loads, and verifies the token as a verify-only key.
    let key = Key::from_jwk(&ring.jwks()["keys"][0]).unwrap();
    assert!(!key.can_sign());
    assert!(verifier(&ring_of(vec![key])).verify(&token).await.is_ok());
}
