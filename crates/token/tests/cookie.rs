//! The sealed client-side state cookie: round trips, rotation, and everything that must open to
//! `None` — tampered, truncated, foreign key, other cookie name, expired, garbage.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use statehouse_token::{
    CookieKeys, KeyError, ManualClock, SEAL_OVERHEAD_BYTES, SealError, SealedCookie,
    SealedCookieConfig,
};

const HOUR: Duration = Duration::from_secs(3600);

fn cart(keys: CookieKeys) -> SealedCookie {
    SealedCookie::new("cart", keys, SealedCookieConfig::new(HOUR)).unwrap()
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Cart {
    items: Vec<(String, u32)>,
}

#[test]
fn state_round_trips_and_each_seal_differs() {
    let cookie = cart(CookieKeys::generate(1).unwrap());
    let a = cookie.seal(b"2x apples").unwrap();
    let b = cookie.seal(b"2x apples").unwrap();
    assert_ne!(a, b, "random nonce per seal");
    assert_eq!(cookie.open(&a).as_deref(), Some(&b"2x apples"[..]));
    assert_eq!(cookie.open(&b).as_deref(), Some(&b"2x apples"[..]));
    assert!(!a.contains("apples"), "encrypted, not just signed");
    assert!(
        a.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    );
    let raw = URL_SAFE_NO_PAD.decode(&a).unwrap();
    assert_eq!(raw.len(), SEAL_OVERHEAD_BYTES + 9);
    assert_eq!(raw[0], 1, "key id byte first");

    let empty = cookie.seal(b"").unwrap();
    assert_eq!(cookie.open(&empty).as_deref(), Some(&b""[..]));

    let state = Cart {
        items: vec![("apple".into(), 2), ("pear".into(), 1)],
    };
    let sealed = cookie.seal_json(&state).unwrap();
    assert_eq!(cookie.open_json::<Cart>(&sealed), Some(state));
    assert_eq!(
        cookie.open_json::<Vec<u8>>(&sealed),
        None,
        "wrong type is no state"
    );
}

#[test]
fn every_tampered_byte_is_rejected() {
    let cookie = cart(CookieKeys::generate(1).unwrap());
    let sealed = cookie.seal(b"{\"items\":[]}").unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
    for i in 0..raw.len() {
        for bit in [0x01, 0x80] {
            let mut t = raw.clone();
            t[i] ^= bit;
            assert_eq!(cookie.open(&URL_SAFE_NO_PAD.encode(&t)), None, "byte {i}");
        }
    }
    // Truncated at every length, and extended.
    for len in 0..raw.len() {
        assert_eq!(
            cookie.open(&URL_SAFE_NO_PAD.encode(&raw[..len])),
            None,
            "len {len}"
        );
    }
    for len in 0..sealed.len() {
        assert_eq!(cookie.open(&sealed[..len]), None, "text len {len}");
    }
    let mut longer = raw.clone();
    longer.push(0);
    assert_eq!(cookie.open(&URL_SAFE_NO_PAD.encode(&longer)), None);
}

#[test]
fn a_value_cannot_move_to_another_cookie_name() {
    let keys = CookieKeys::generate(1).unwrap();
    let cart = cart(keys.clone());
    let prefs = SealedCookie::new("prefs", keys, SealedCookieConfig::new(HOUR)).unwrap();
    let sealed = cart.seal(b"state").unwrap();
    assert_eq!(prefs.open(&sealed), None, "the name is authenticated");
    assert!(cart.open(&sealed).is_some());
}

#[test]
fn keys_rotate_newest_seals_all_open_foreign_keys_fail() {
    let old_key = [1u8; 32];
    let new_key = [2u8; 32];
    let old = cart(CookieKeys::new().with_key(1, old_key).unwrap());
    let sealed_old = old.seal(b"before rotation").unwrap();

    let rotated = cart(
        CookieKeys::new()
            .with_key(1, old_key)
            .unwrap()
            .with_key(2, new_key)
            .unwrap(),
    );
    let sealed_new = rotated.seal(b"after rotation").unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.decode(&sealed_new).unwrap()[0],
        2,
        "newest key seals"
    );
    assert_eq!(
        rotated.open(&sealed_old).as_deref(),
        Some(&b"before rotation"[..])
    );
    assert_eq!(
        rotated.open(&sealed_new).as_deref(),
        Some(&b"after rotation"[..])
    );
    assert_eq!(old.open(&sealed_new), None, "unknown key id");

    // Old key retired.
    let retired = cart(CookieKeys::new().with_key(2, new_key).unwrap());
    assert_eq!(retired.open(&sealed_old), None);

    // Same key id, different key material (another deployment): no state.
    let foreign = cart(CookieKeys::new().with_key(1, [9u8; 32]).unwrap());
    assert_eq!(foreign.open(&sealed_old), None);

    assert!(matches!(
        CookieKeys::new()
            .with_key(1, old_key)
            .unwrap()
            .with_key(1, new_key),
        Err(KeyError::DuplicateKid(_))
    ));
}

#[test]
fn an_expired_cookie_is_no_state() {
    let clock = ManualClock::at_unix_secs(1_700_000_000);
    let cookie = cart(CookieKeys::generate(1).unwrap()).with_clock(clock.clock());
    let sealed = cookie.seal(b"cart").unwrap();
    clock.advance(HOUR - Duration::from_secs(1));
    assert!(cookie.open(&sealed).is_some());
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        cookie.open(&sealed),
        None,
        "expiry is inside the ciphertext"
    );

    let explicit = cookie.seal_until(b"x", clock.unix_secs() + 10).unwrap();
    assert!(cookie.open(&explicit).is_some());
    clock.advance(Duration::from_secs(10));
    assert_eq!(cookie.open(&explicit), None);
}

#[test]
fn the_size_cap_is_a_clear_error() {
    let cookie = cart(CookieKeys::generate(1).unwrap());
    let max = cookie.max_state_bytes();
    let sealed = cookie.seal(&vec![b'x'; max]).unwrap();
    assert!(sealed.len() <= 4000, "{}", sealed.len());
    match cookie.seal(&vec![b'x'; max + 1]) {
        Err(e @ SealError::TooLarge { size, limit }) => {
            assert_eq!(limit, 4000);
            assert!(size > 4000);
            assert!(e.to_string().contains("over the limit of 4000"), "{e}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Oversized input to open is refused before decoding.
    assert_eq!(cookie.open(&"A".repeat(5000)), None);
}

#[test]
fn garbage_opens_to_none() {
    let cookie = cart(CookieKeys::generate(1).unwrap());
    for garbage in [
        "",
        "=",
        "a",
        "!!!!",
        "null",
        "deleted",
        "eyJhbGciOiJub25lIn0",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "////////////////////////////////////////////////////////////////////////",
        "é",
        "\0\0\0",
    ] {
        assert_eq!(cookie.open(garbage), None, "{garbage:?}");
    }
}

#[test]
fn the_request_cookie_header_is_read_and_set_cookie_is_secure() {
    let cookie = cart(CookieKeys::generate(1).unwrap());
    let sealed = cookie.seal(b"mine").unwrap();
    let foreign = cart(CookieKeys::generate(1).unwrap())
        .seal(b"theirs")
        .unwrap();

    let mut headers = HeaderMap::new();
    assert_eq!(cookie.open_request(&headers), None);
    headers.append(
        header::COOKIE,
        HeaderValue::from_str(&format!("theme=dark; cart={foreign}; other=1")).unwrap(),
    );
    assert_eq!(
        cookie.open_request(&headers),
        None,
        "a cart that does not open"
    );
    headers.append(
        header::COOKIE,
        HeaderValue::from_str(&format!("cartx=1; cart=\"{sealed}\"")).unwrap(),
    );
    assert_eq!(cookie.open_request(&headers).as_deref(), Some(&b"mine"[..]));

    let set = cookie.set_cookie(&sealed).unwrap();
    let set = set.to_str().unwrap();
    assert!(set.starts_with(&format!("cart={sealed}; ")), "{set}");
    for attribute in [
        "Path=/",
        "Max-Age=3600",
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
    ] {
        assert!(set.contains(attribute), "{set} lacks {attribute}");
    }
    assert!(
        cookie
            .clear_cookie()
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[test]
fn cookie_keys_load_from_a_spec() {
    let env = |name: &str| match name {
        "K1" => Some("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_owned()),
        "K2" => Some("AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI".to_owned()),
        "SHORT" => Some("AQID".to_owned()),
        _ => None,
    };
    let keys = CookieKeys::from_spec("1:env:K1, 2:env:K2", env).unwrap();
    let from_spec = cart(keys);
    let by_hand = cart(
        CookieKeys::new()
            .with_key(1, [1; 32])
            .unwrap()
            .with_key(2, [2; 32])
            .unwrap(),
    );
    let sealed = from_spec.seal(b"x").unwrap();
    assert_eq!(by_hand.open(&sealed).as_deref(), Some(&b"x"[..]));
    assert_eq!(URL_SAFE_NO_PAD.decode(&sealed).unwrap()[0], 2);

    for (spec, needle) in [
        ("", "names no key"),
        ("1:env:SHORT", "exactly 32 bytes"),
        ("256:env:K1", "0 to 255"),
        ("1:env:NOPE", "NOPE"),
        ("1:ftp:K1", "env:VAR or file:PATH"),
        ("1:env:K1 1:env:K2", "twice"),
    ] {
        let e = CookieKeys::from_spec(spec, env).unwrap_err().to_string();
        assert!(e.contains(needle), "{spec:?}: {e}");
        assert!(!e.contains("AQEB"), "key material in error: {e}");
    }
    assert!(
        SealedCookie::new("bad name", CookieKeys::new(), SealedCookieConfig::new(HOUR)).is_err()
    );
    assert!(SealedCookie::new("", CookieKeys::new(), SealedCookieConfig::new(HOUR)).is_err());
    let keyless = cart(CookieKeys::new());
    assert!(matches!(keyless.seal(b"x"), Err(SealError::NoKey)));
    assert_eq!(
        format!("{:?}", CookieKeys::new().with_key(7, [7; 32]).unwrap()),
        "CookieKeys { ids: [7] }"
    );
}
