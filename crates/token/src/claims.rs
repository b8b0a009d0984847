//! The claims of an access token.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The registered claims every access token carries, plus the issuer's extra claims.
///
/// This is the token's wire format (RFC 7519), so it is serializable on purpose. `aud` is written
/// as a string when there is one audience and as an array otherwise, and read in either form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    #[serde(serialize_with = "audience_out", deserialize_with = "audience_in")]
    pub aud: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Not before, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// The token's unique id: the key of its revocation-list entry.
    pub jti: String,
    /// Everything else the issuer put in (roles, tenant, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Claim names the issuer sets itself; extra claims may not use them.
pub const RESERVED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

fn audience_out<S: Serializer>(aud: &[String], s: S) -> Result<S::Ok, S::Error> {
    match aud {
        [one] => s.serialize_str(one),
        many => many.serialize(s),
    }
}

fn audience_in<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_round_trips_as_string_or_array() {
        let mut claims = Claims {
            iss: "i".into(),
            sub: "s".into(),
            aud: vec!["a".into()],
            exp: 2,
            nbf: None,
            iat: 1,
            jti: "j".into(),
            extra: Default::default(),
        };
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(json["aud"], "a");
        assert!(json.get("nbf").is_none());
        assert_eq!(serde_json::from_value::<Claims>(json).unwrap(), claims);
        claims.aud.push("b".into());
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(json["aud"], serde_json::json!(["a", "b"]));
        assert_eq!(serde_json::from_value::<Claims>(json).unwrap(), claims);
    }
}
