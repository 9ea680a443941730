//! HS512 JSON Web Tokens (RFC 7519), as the digipay document's example uses: signed and
//! verified here with the HMAC and SHA-512 the OTP engine already depends on, rather than
//! through a JWT crate that would pull RSA and elliptic-curve code into the binary for one
//! algorithm. Tests verify our tokens with the `jsonwebtoken` crate.

use data_encoding::BASE64URL_NOPAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::crypto::ct_eq;
use crate::error::CoreError;

/// The claims otpgate puts in a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// The tenant's id.
    pub tid: String,
    /// The device the token is bound to (its `device_unique_id`).
    pub did: String,
    /// Issued at (Unix seconds).
    pub iat: i64,
    /// Expires at (Unix seconds).
    pub exp: i64,
    /// A unique id, for revocation.
    pub jti: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

fn mac(key: &[u8], signing_input: &[u8]) -> Result<Vec<u8>, CoreError> {
    let mut mac = <Hmac<sha2::Sha512> as KeyInit>::new_from_slice(key)
        .map_err(|_| CoreError::Internal("HMAC key refused".into()))?;
    mac.update(signing_input);
    Ok(mac.finalize().into_bytes().to_vec())
}

fn encode_json<T: Serialize>(value: &T) -> Result<String, CoreError> {
    serde_json::to_vec(value)
        .map(|json| BASE64URL_NOPAD.encode(&json))
        .map_err(|e| CoreError::Internal(format!("JWT encoding: {e}")))
}

/// Signs `claims` with `key`, naming the key `kid` in the header.
pub fn sign(key: &[u8], kid: &str, claims: &Claims) -> Result<String, CoreError> {
    let header = Header {
        alg: "HS512".into(),
        typ: "JWT".into(),
        kid: kid.into(),
    };
    let signing_input = format!("{}.{}", encode_json(&header)?, encode_json(claims)?);
    let signature = mac(key, signing_input.as_bytes())?;
    Ok(format!(
        "{signing_input}.{}",
        BASE64URL_NOPAD.encode(&signature)
    ))
}

/// The key id a token names, before its signature is checked (to pick the key).
pub fn key_id(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = BASE64URL_NOPAD.decode(header.as_bytes()).ok()?;
    let header: Header = serde_json::from_slice(&bytes).ok()?;
    (header.alg == "HS512").then_some(header.kid)
}

/// Verifies the signature with `key` and the expiry at `now_unix`; the claims when both hold.
pub fn verify(token: &str, key: &[u8], now_unix: i64) -> Option<Claims> {
    let mut parts = token.trim().split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header_bytes = BASE64URL_NOPAD.decode(header.as_bytes()).ok()?;
    let parsed: Header = serde_json::from_slice(&header_bytes).ok()?;
    if parsed.alg != "HS512" {
        return None;
    }
    let expected = mac(key, format!("{header}.{payload}").as_bytes()).ok()?;
    let given = BASE64URL_NOPAD.decode(signature.as_bytes()).ok()?;
    if !ct_eq(&expected, &given) {
        return None;
    }
    let claims: Claims =
        serde_json::from_slice(&BASE64URL_NOPAD.decode(payload.as_bytes()).ok()?).ok()?;
    (now_unix < claims.exp).then_some(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "u".into(),
            tid: "t".into(),
            did: "d".into(),
            iat: 1,
            exp,
            jti: "j".into(),
        }
    }

    #[test]
    fn a_signed_token_verifies_with_its_key_only_until_it_expires() {
        let token = sign(b"key-one", "k1", &claims(100)).unwrap();
        assert_eq!(key_id(&token).as_deref(), Some("k1"));
        assert_eq!(verify(&token, b"key-one", 99), Some(claims(100)));
        assert_eq!(verify(&token, b"key-one", 100), None);
        assert_eq!(verify(&token, b"key-two", 99), None);
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let token = sign(b"key", "k1", &claims(100)).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = BASE64URL_NOPAD.encode(
            &serde_json::to_vec(&Claims {
                sub: "admin".into(),
                ..claims(100)
            })
            .unwrap(),
        );
        parts[1] = &forged;
        assert_eq!(verify(&parts.join("."), b"key", 1), None);
        let none_alg = format!(
            "{}.{}.",
            BASE64URL_NOPAD.encode(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
            parts[1]
        );
        assert_eq!(verify(&none_alg, b"key", 1), None);
    }
}
