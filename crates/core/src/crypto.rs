//! Primitives the rules are built from: OS randomness, the master key (AES-256-GCM for secrets at
//! rest, HMAC-derived sub-keys), SHA-256 and constant-time comparison.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::CoreError;

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), CoreError> {
    getrandom::fill(buf).map_err(|e| CoreError::Internal(format!("OS random source failed: {e}")))
}

/// `N` random bytes from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CoreError> {
    let mut buf = [0u8; N];
    fill_random(&mut buf)?;
    Ok(buf)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA256 of `parts` (fed in order) under `key`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable_hmac(),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> Hmac<Sha256> {
    // HMAC's key length is unbounded; keep a defined value rather than a panic.
    <Hmac<Sha256> as KeyInit>::new(&Default::default())
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

const NONCE_LEN: usize = 12;

/// The server's master key: encrypts secrets at rest and derives the keys that hash codes.
pub struct MasterKey {
    key: SecretBox<[u8; 32]>,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A key from 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey {
            key: SecretBox::new(Box::new(bytes)),
        }
    }

    /// Parses 64 hex digits (surrounding white space ignored).
    pub fn from_hex(text: &str) -> Result<Self, CoreError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes)
            .map_err(|_| CoreError::invalid("master_key", "must be 64 hexadecimal digits"))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, CoreError> {
        Ok(Self::from_bytes(random_bytes()?))
    }

    /// The key as 64 hex digits, for writing the key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.expose_secret())
    }

    /// A sub-key for one purpose, so no two uses share a key.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        hmac_sha256(
            self.key.expose_secret(),
            &[b"otpgate/v1/", purpose.as_bytes()],
        )
    }

    /// Encrypts `plaintext` bound to `context` (the row it belongs to): nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, CoreError> {
        let cipher = self.cipher()?;
        let nonce_bytes: [u8; NONCE_LEN] = random_bytes()?;
        let nonce = Nonce::from(nonce_bytes);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .map_err(|_| CoreError::Internal("encryption failed".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Reverses [`MasterKey::seal`]; fails when the key, the context or the bytes differ.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, CoreError> {
        let (nonce_bytes, body) = sealed
            .split_at_checked(NONCE_LEN)
            .ok_or_else(|| CoreError::Internal("sealed value too short".into()))?;
        let nonce_array: [u8; NONCE_LEN] = nonce_bytes
            .try_into()
            .map_err(|_| CoreError::Internal("bad nonce".into()))?;
        self.cipher()?
            .decrypt(
                &Nonce::from(nonce_array),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .map_err(|_| CoreError::Internal("decryption failed (wrong master key?)".into()))
    }

    fn cipher(&self) -> Result<Aes256Gcm, CoreError> {
        Aes256Gcm::new_from_slice(self.key.expose_secret())
            .map_err(|_| CoreError::Internal("bad key length".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_the_same_key_and_context() {
        let key = MasterKey::generate().unwrap();
        let sealed = key.seal(b"secret", b"factor-1").unwrap();
        assert_eq!(key.open(&sealed, b"factor-1").unwrap(), b"secret");
        assert!(key.open(&sealed, b"factor-2").is_err());
        assert!(
            MasterKey::generate()
                .unwrap()
                .open(&sealed, b"factor-1")
                .is_err()
        );
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn master_key_round_trips_through_hex() {
        let key = MasterKey::generate().unwrap();
        let again = MasterKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(key.derive("x"), again.derive("x"));
        assert_ne!(key.derive("x"), key.derive("y"));
        assert!(MasterKey::from_hex("zz").is_err());
    }
}
