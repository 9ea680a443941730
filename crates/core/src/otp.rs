//! HOTP (RFC 4226) and TOTP (RFC 6238) with SHA-1, SHA-256 and SHA-512, 6 to 8 digits, any
//! period. Written here rather than taken from a crate because it is the product: the replay rule
//! (each time step accepted once) and the constant-time comparison are ours to get right.

use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::crypto::ct_eq;
use crate::error::CoreError;

/// The HMAC hash of an HOTP/TOTP factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// RFC 4226's default, and what every authenticator app supports.
    #[default]
    Sha1,
    /// SHA-256 (RFC 6238).
    Sha256,
    /// SHA-512 (RFC 6238).
    Sha512,
}

impl Algorithm {
    /// The name used in `otpauth://` URIs and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    /// Parses [`Algorithm::as_str`]'s names.
    pub fn parse(name: &str) -> Result<Self, CoreError> {
        match name.to_ascii_uppercase().as_str() {
            "SHA1" => Ok(Algorithm::Sha1),
            "SHA256" => Ok(Algorithm::Sha256),
            "SHA512" => Ok(Algorithm::Sha512),
            _ => Err(CoreError::invalid(
                "algorithm",
                "must be SHA1, SHA256 or SHA512",
            )),
        }
    }
}

fn mac_of<M: Mac + KeyInit>(secret: &[u8], message: &[u8]) -> Result<Vec<u8>, CoreError> {
    let mut mac = <M as KeyInit>::new_from_slice(secret)
        .map_err(|_| CoreError::Internal("HMAC key refused".into()))?;
    mac.update(message);
    Ok(mac.finalize().into_bytes().to_vec())
}

/// The HOTP value of `counter` (RFC 4226 §5.3), as a number below 10^digits.
pub fn hotp(
    secret: &[u8],
    counter: u64,
    digits: u8,
    algorithm: Algorithm,
) -> Result<u32, CoreError> {
    if !(6..=8).contains(&digits) {
        return Err(CoreError::invalid("digits", "must be 6, 7 or 8"));
    }
    let message = counter.to_be_bytes();
    let mac = match algorithm {
        Algorithm::Sha1 => mac_of::<Hmac<sha1::Sha1>>(secret, &message)?,
        Algorithm::Sha256 => mac_of::<Hmac<sha2::Sha256>>(secret, &message)?,
        Algorithm::Sha512 => mac_of::<Hmac<sha2::Sha512>>(secret, &message)?,
    };
    let last = mac.last().copied().unwrap_or(0);
    let offset = usize::from(last & 0x0f);
    let window: [u8; 4] = mac
        .get(offset..offset + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| CoreError::Internal("short HMAC".into()))?;
    let binary = u32::from_be_bytes(window) & 0x7fff_ffff;
    Ok(binary % 10u32.pow(u32::from(digits)))
}

/// A zero-padded code string for `value`.
pub fn format_code(value: u32, digits: u8) -> String {
    format!("{value:0width$}", width = usize::from(digits))
}

/// The parameters of a TOTP factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TotpParams {
    /// HMAC hash.
    pub algorithm: Algorithm,
    /// Code length, 6 to 8.
    pub digits: u8,
    /// Time step in seconds (30 by default).
    pub period: u32,
}

impl Default for TotpParams {
    fn default() -> Self {
        TotpParams {
            algorithm: Algorithm::Sha1,
            digits: 6,
            period: 30,
        }
    }
}

impl TotpParams {
    /// Checks the parameters are usable.
    pub fn validate(&self) -> Result<(), CoreError> {
        if !(6..=8).contains(&self.digits) {
            return Err(CoreError::invalid("digits", "must be 6, 7 or 8"));
        }
        if self.period == 0 {
            return Err(CoreError::invalid("period", "must be positive"));
        }
        Ok(())
    }

    /// The time step that contains `unix_seconds` (RFC 6238 §4.2, T0 = 0).
    pub fn step_at(&self, unix_seconds: i64) -> i64 {
        unix_seconds.div_euclid(i64::from(self.period.max(1)))
    }

    /// The code of one time step.
    pub fn code_at_step(&self, secret: &[u8], step: i64) -> Result<String, CoreError> {
        let counter = u64::try_from(step).map_err(|_| CoreError::invalid("time", "before 1970"))?;
        Ok(format_code(
            hotp(secret, counter, self.digits, self.algorithm)?,
            self.digits,
        ))
    }

    /// The code at a moment.
    pub fn code_at(&self, secret: &[u8], unix_seconds: i64) -> Result<String, CoreError> {
        self.code_at_step(secret, self.step_at(unix_seconds))
    }

    /// Verifies `code` at `unix_seconds` within ±`window` steps (RFC 6238 §5.2). Returns the
    /// matching step, but only if it is later than `last_accepted_step`, so no code works twice
    /// (§5.2: "the verifier MUST NOT accept the second attempt of the OTP").
    pub fn verify(
        &self,
        secret: &[u8],
        code: &str,
        unix_seconds: i64,
        window: i64,
        last_accepted_step: Option<i64>,
    ) -> Result<Option<i64>, CoreError> {
        let current = self.step_at(unix_seconds);
        let mut matched = None;
        // Every candidate is computed and compared, so timing says nothing about which matched.
        for step in (current - window)..=(current + window) {
            if step < 0 {
                continue;
            }
            let expected = self.code_at_step(secret, step)?;
            if ct_eq(expected.as_bytes(), code.as_bytes()) {
                matched = Some(step);
            }
        }
        Ok(matched.filter(|step| last_accepted_step.is_none_or(|last| *step > last)))
    }
}

/// Base32 (no padding) of a secret, as authenticator apps expect.
pub fn secret_to_base32(secret: &[u8]) -> String {
    BASE32_NOPAD.encode(secret)
}

/// Decodes a base32 secret (spaces and lowercase allowed, padding optional).
pub fn secret_from_base32(text: &str) -> Result<Vec<u8>, CoreError> {
    let cleaned: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '=')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    BASE32_NOPAD
        .decode(cleaned.as_bytes())
        .map_err(|_| CoreError::invalid("secret", "is not valid base32"))
}

/// The `otpauth://totp/...` URI of a factor (Key Uri Format), for QR codes.
pub fn otpauth_uri(secret: &[u8], params: &TotpParams, issuer: &str, account: &str) -> String {
    let issuer_enc = utf8_percent_encode(issuer, NON_ALPHANUMERIC).to_string();
    let account_enc = utf8_percent_encode(account, NON_ALPHANUMERIC).to_string();
    format!(
        "otpauth://totp/{issuer_enc}:{account_enc}?secret={}&issuer={issuer_enc}&algorithm={}&digits={}&period={}",
        secret_to_base32(secret),
        params.algorithm.as_str(),
        params.digits,
        params.period
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED20: &[u8] = b"12345678901234567890";
    const SEED32: &[u8] = b"12345678901234567890123456789012";
    const SEED64: &[u8] = b"1234567890123456789012345678901234567890123456789012345678901234";

    #[test]
    fn rfc4226_appendix_d_values() {
        let expected = [
            755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489,
        ];
        for (counter, want) in expected.iter().enumerate() {
            assert_eq!(
                hotp(SEED20, counter as u64, 6, Algorithm::Sha1).unwrap(),
                *want
            );
        }
    }

    #[test]
    fn rfc6238_appendix_b_values() {
        let table: [(i64, &str, &str, &str); 6] = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ];
        for (time, sha1, sha256, sha512) in table {
            for (algorithm, seed, want) in [
                (Algorithm::Sha1, SEED20, sha1),
                (Algorithm::Sha256, SEED32, sha256),
                (Algorithm::Sha512, SEED64, sha512),
            ] {
                let params = TotpParams {
                    algorithm,
                    digits: 8,
                    period: 30,
                };
                assert_eq!(
                    params.code_at(seed, time).unwrap(),
                    want,
                    "{algorithm:?} at {time}"
                );
            }
        }
    }

    #[test]
    fn totp_accepts_one_step_either_side_and_not_two() {
        let params = TotpParams::default();
        let now = 1_700_000_000;
        let step = params.step_at(now);
        for offset in [-1, 0, 1] {
            let code = params.code_at_step(SEED20, step + offset).unwrap();
            assert_eq!(
                params.verify(SEED20, &code, now, 1, None).unwrap(),
                Some(step + offset)
            );
        }
        for offset in [-2, 2] {
            let code = params.code_at_step(SEED20, step + offset).unwrap();
            assert_eq!(params.verify(SEED20, &code, now, 1, None).unwrap(), None);
        }
    }

    #[test]
    fn totp_refuses_a_step_already_accepted() {
        let params = TotpParams::default();
        let now = 1_700_000_000;
        let code = params.code_at(SEED20, now).unwrap();
        let step = params.verify(SEED20, &code, now, 1, None).unwrap().unwrap();
        assert_eq!(
            params.verify(SEED20, &code, now, 1, Some(step)).unwrap(),
            None
        );
        // An older code inside the window is refused once a later step was used.
        let previous = params.code_at_step(SEED20, step - 1).unwrap();
        assert_eq!(
            params
                .verify(SEED20, &previous, now, 1, Some(step))
                .unwrap(),
            None
        );
    }

    #[test]
    fn otpauth_uri_names_every_parameter() {
        let uri = otpauth_uri(
            SEED20,
            &TotpParams::default(),
            "otp gate",
            "ali@example.com",
        );
        assert_eq!(
            uri,
            "otpauth://totp/otp%20gate:ali%40example%2Ecom?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=otp%20gate&algorithm=SHA1&digits=6&period=30"
        );
    }
}
