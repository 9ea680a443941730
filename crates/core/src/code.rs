//! One-time codes sent by SMS or e-mail: generation from the OS CSPRNG, normalisation of what a
//! person typed, and the keyed hash that is all the store ever sees.

use crate::crypto::{ct_eq, fill_random, hmac_sha256};
use crate::error::CoreError;

/// A syntactically valid code: ASCII digits only, already normalised.
#[derive(Clone, PartialEq, Eq)]
pub struct OtpCode(String);

impl std::fmt::Debug for OtpCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtpCode(..)")
    }
}

/// Maps Persian (U+06F0..) and Arabic-Indic (U+0660..) digits to ASCII; other chars unchanged.
pub fn normalize_digit(c: char) -> char {
    match c {
        '\u{06F0}'..='\u{06F9}' => char::from(b'0' + (c as u32 - 0x06F0) as u8),
        '\u{0660}'..='\u{0669}' => char::from(b'0' + (c as u32 - 0x0660) as u8),
        other => other,
    }
}

/// Calls `take` `count` times with an index below `n` (1 to 256), each equally likely: bytes
/// from the OS CSPRNG, rejected at or above the largest multiple of `n`. The bytes come a block
/// at a time: one system call per code instead of one per character.
fn uniform_indexes(count: usize, n: usize, mut take: impl FnMut(u8)) -> Result<(), CoreError> {
    if !(1..=256).contains(&n) {
        return Err(CoreError::Internal(format!("cannot draw from {n} symbols")));
    }
    let limit = 256 - 256 % n;
    let mut block = [0u8; 32];
    let mut taken = 0;
    while taken < count {
        fill_random(&mut block)?;
        for &byte in block.iter().filter(|&&b| usize::from(b) < limit) {
            if taken == count {
                break;
            }
            // `byte % n` is below `n` <= 256, so it fits a byte.
            take(u8::try_from(usize::from(byte) % n).unwrap_or(0));
            taken += 1;
        }
    }
    Ok(())
}

impl OtpCode {
    /// Parses a typed code: surrounding white space dropped, Persian and Arabic-Indic digits
    /// made ASCII; anything else that is not a digit, or a length other than `expected_len`
    /// (or any of 6..=8 when `None`), is refused before any counter is touched.
    pub fn parse(input: &str, expected_len: Option<usize>) -> Result<Self, CoreError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(CoreError::invalid("code", "is required"));
        }
        let mut digits = String::with_capacity(trimmed.len());
        for c in trimmed.chars().map(normalize_digit) {
            if !c.is_ascii_digit() {
                return Err(CoreError::invalid("code", "must contain digits only"));
            }
            digits.push(c);
        }
        let ok_len = match expected_len {
            Some(n) => digits.len() == n,
            None => (6..=8).contains(&digits.len()),
        };
        if !ok_len {
            let wanted = expected_len.map_or("6 to 8".to_owned(), |n| n.to_string());
            return Err(CoreError::invalid(
                "code",
                format!("must be {wanted} digits"),
            ));
        }
        Ok(OtpCode(digits))
    }

    /// A fresh uniformly random code of `len` digits.
    pub fn generate(len: u8) -> Result<Self, CoreError> {
        let mut digits = String::with_capacity(usize::from(len));
        uniform_indexes(usize::from(len), 10, |digit| {
            digits.push(char::from(b'0'.saturating_add(digit)));
        })?;
        Ok(OtpCode(digits))
    }

    /// The digits, for the outgoing message only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The keyed hash stored for this code, bound to the challenge it belongs to.
    pub fn keyed_hash(&self, key: &[u8; 32], challenge_id: &str) -> [u8; 32] {
        hmac_sha256(key, &[challenge_id.as_bytes(), b":", self.0.as_bytes()])
    }

    /// Whether this code matches `stored_hash`, compared in constant time.
    pub fn matches(&self, key: &[u8; 32], challenge_id: &str, stored_hash: &[u8]) -> bool {
        ct_eq(&self.keyed_hash(key, challenge_id), stored_hash)
    }
}

/// Letters and digits of recovery codes: no 0/o, 1/l/i, so they survive being copied by hand.
const RECOVERY_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";

/// Characters in a recovery code (about 50 bits).
pub const RECOVERY_CODE_LEN: usize = 10;

/// A single-use recovery code, `xxxxx-xxxxx`; compared lowercased without the dash.
#[derive(Clone, PartialEq, Eq)]
pub struct RecoveryCode(String);

impl std::fmt::Debug for RecoveryCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecoveryCode(..)")
    }
}

impl RecoveryCode {
    /// A fresh random code.
    pub fn generate() -> Result<Self, CoreError> {
        let mut code = String::with_capacity(RECOVERY_CODE_LEN);
        uniform_indexes(RECOVERY_CODE_LEN, RECOVERY_ALPHABET.len(), |i| {
            if let Some(c) = RECOVERY_ALPHABET.get(usize::from(i)) {
                code.push(char::from(*c));
            }
        })?;
        Ok(RecoveryCode(code))
    }

    /// Parses what a person typed: case, spaces and dashes do not matter.
    pub fn parse(input: &str) -> Option<Self> {
        let cleaned: String = input
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let valid = cleaned.len() == RECOVERY_CODE_LEN
            && cleaned.bytes().all(|b| RECOVERY_ALPHABET.contains(&b))
            && cleaned.bytes().any(|b| b.is_ascii_alphabetic());
        valid.then_some(RecoveryCode(cleaned))
    }

    /// The code as shown once to the user: `xxxxx-xxxxx`.
    pub fn display(&self) -> String {
        let (a, b) = self.0.split_at(RECOVERY_CODE_LEN / 2);
        format!("{a}-{b}")
    }

    /// The keyed hash stored for this code, bound to its user.
    pub fn keyed_hash(&self, key: &[u8; 32], user_id: &str) -> [u8; 32] {
        hmac_sha256(
            key,
            &[b"recovery:", user_id.as_bytes(), b":", self.0.as_bytes()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persian_and_arabic_digits_and_spaces_are_normalised() {
        assert_eq!(
            OtpCode::parse(" ۱۲۳۴۵۶ ", Some(6)).unwrap().expose(),
            "123456"
        );
        assert_eq!(
            OtpCode::parse("١٢٣٤٥٦", Some(6)).unwrap().expose(),
            "123456"
        );
        assert_eq!(
            OtpCode::parse("12345678", None).unwrap().expose(),
            "12345678"
        );
    }

    #[test]
    fn letters_inner_spaces_and_wrong_lengths_are_refused() {
        for bad in [
            "12a456",
            "123 456",
            "12345",
            "1234567",
            "",
            "   ",
            "１２３４５６",
        ] {
            assert!(OtpCode::parse(bad, Some(6)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_codes_have_the_length_and_only_digits() {
        for len in [4u8, 6, 8, 10] {
            let code = OtpCode::generate(len).unwrap();
            assert_eq!(code.expose().len(), usize::from(len));
            assert!(code.expose().bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn drawn_indexes_cover_every_symbol_evenly_across_blocks() {
        // 20,000 draws need many blocks of random bytes: a block's bytes must all be used or
        // dropped, never counted twice, and every symbol must come out about as often.
        let mut seen = [0u32; 31];
        let mut drawn = 0;
        uniform_indexes(20_000, 31, |i| {
            seen[usize::from(i)] += 1;
            drawn += 1;
        })
        .unwrap();
        assert_eq!(drawn, 20_000);
        // 645 expected each; five standard deviations (about 125) either side.
        assert!(seen.iter().all(|&n| (520..=770).contains(&n)), "{seen:?}");
        let mut digits = [0u32; 10];
        uniform_indexes(20_000, 10, |d| digits[usize::from(d)] += 1).unwrap();
        assert!(
            digits.iter().all(|&n| (1800..=2200).contains(&n)),
            "{digits:?}"
        );
        assert!(uniform_indexes(1, 0, |_| {}).is_err());
        assert!(uniform_indexes(1, 257, |_| {}).is_err());
        let mut any = 0;
        uniform_indexes(3, 256, |_| any += 1).unwrap();
        assert_eq!(any, 3);
    }

    #[test]
    fn recovery_codes_parse_loosely_and_hash_per_user() {
        let code = RecoveryCode::generate().unwrap();
        let shown = code.display();
        assert_eq!(shown.len(), RECOVERY_CODE_LEN + 1);
        let typed = RecoveryCode::parse(&format!(" {} ", shown.to_uppercase())).unwrap();
        assert_eq!(typed, code);
        assert_ne!(
            code.keyed_hash(&[1; 32], "u1"),
            code.keyed_hash(&[1; 32], "u2")
        );
        assert!(RecoveryCode::parse("123456").is_none());
        assert!(RecoveryCode::parse("abcde-fgh0").is_none());
    }

    #[test]
    fn a_code_matches_only_its_own_challenge() {
        let key = [7u8; 32];
        let code = OtpCode::parse("123456", Some(6)).unwrap();
        let hash = code.keyed_hash(&key, "a");
        assert!(code.matches(&key, "a", &hash));
        assert!(!code.matches(&key, "b", &hash));
        let other = OtpCode::parse("123457", Some(6)).unwrap();
        assert!(!other.matches(&key, "a", &hash));
    }
}
