//! Bearer secrets: session tokens (32 lowercase hex, as the ACL document shows), login tickets and
//! API keys. Each is 128 bits or more from the OS CSPRNG and stored only as its SHA-256.

use secrecy::SecretString;

use crate::crypto::{random_bytes, sha256};
use crate::error::CoreError;

/// Prefix of API keys, so leaked keys are recognisable by secret scanners.
pub const API_KEY_PREFIX: &str = "ogk_";

/// A freshly minted secret and the hash the store keeps.
pub struct Minted {
    /// Shown to the client once.
    pub secret: SecretString,
    /// What the store keeps.
    pub hash: [u8; 32],
}

/// A new 128-bit token as 32 lowercase hex digits.
pub fn mint_hex_token() -> Result<Minted, CoreError> {
    let raw: [u8; 16] = random_bytes()?;
    let text = hex::encode(raw);
    let hash = hash_token(&text);
    Ok(Minted {
        secret: SecretString::from(text),
        hash,
    })
}

/// A new 256-bit API key, `ogk_` followed by 64 lowercase hex digits.
pub fn mint_api_key() -> Result<Minted, CoreError> {
    let raw: [u8; 32] = random_bytes()?;
    let text = format!("{API_KEY_PREFIX}{}", hex::encode(raw));
    let hash = hash_token(&text);
    Ok(Minted {
        secret: SecretString::from(text),
        hash,
    })
}

/// The stored form of a presented token. Tokens carry 128+ bits of entropy, so a fast hash is
/// enough (no password-style stretching), and the lookup by hash leaks no timing on the secret.
pub fn hash_token(presented: &str) -> [u8; 32] {
    sha256(presented.trim().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn tokens_are_32_lowercase_hex_and_distinct() {
        let a = mint_hex_token().unwrap();
        let b = mint_hex_token().unwrap();
        let text = a.secret.expose_secret();
        assert_eq!(text.len(), 32);
        assert!(text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        assert_ne!(text, b.secret.expose_secret());
        assert_eq!(hash_token(text), a.hash);
    }

    #[test]
    fn api_keys_carry_their_prefix() {
        let key = mint_api_key().unwrap();
        assert!(key.secret.expose_secret().starts_with(API_KEY_PREFIX));
        assert_eq!(key.secret.expose_secret().len(), 4 + 64);
    }
}
