//! Bearer secrets: session tokens (32 lowercase hex, as the ACL document shows), login tickets and
//! API keys, from the OS CSPRNG and stored only as hashes. Session tokens and login tickets begin
//! with their minting time, and their stored keys keep it in front of the hash, so that the
//! store's index takes new keys at one place instead of at random ones.

use secrecy::SecretString;
use time::OffsetDateTime;

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

/// Hex digits of a session token's time prefix: its minting time in steps of 4 ms, modulo 2^24.
/// The count wraps every 18.6 hours, longer than a session lives (10 hours by default).
const SESSION_TIME_HEX: usize = 6;

/// Length of a session token: 32 lowercase hex digits, as the ACL document shows.
pub const SESSION_TOKEN_LEN: usize = 32;

/// A new session token: its minting time (6 hex digits, see [`SESSION_TIME_HEX`]), then 104
/// random bits (26 hex digits). A token of 128 random bits would be a random key, and each
/// login would write its session's key on a random page of the store's index: with SQLite,
/// that page was most of what a login wrote to the WAL and what the checkpoint copied. 104
/// bits are still beyond any guess (OWASP asks for 64), and the time says only when the
/// client logged in, modulo 18.6 hours.
pub fn mint_session_token(now: OffsetDateTime) -> Result<Minted, CoreError> {
    let raw: [u8; 13] = random_bytes()?;
    let text = format!("{}{}", hex::encode(session_time(now)), hex::encode(raw));
    let hash = session_key(&text);
    Ok(Minted {
        secret: SecretString::from(text),
        hash,
    })
}

/// The 3 bytes of a session token's time: 4-millisecond steps since 1970, modulo 2^24. Sessions
/// minted in the same few milliseconds (a commit's worth) share them.
fn session_time(now: OffsetDateTime) -> [u8; 3] {
    let steps = (now.unix_timestamp_nanos() / 4_000_000).rem_euclid(1 << 24) as u32;
    let mut time = [0u8; 3];
    time.copy_from_slice(&steps.to_be_bytes()[1..]);
    time
}

/// The stored key of a presented session token: its 3 bytes of time, then the first 29 bytes of
/// its SHA-256 (232 bits, more than any guess can match). Anything else keys as its SHA-256.
/// Tokens minted before 2026-12-04 (128 random bits) were stored under their SHA-256; see
/// [`session_keys`].
pub fn session_key(presented: &str) -> [u8; 32] {
    session_keys(presented).0
}

/// A presented session token's [`session_key`] and, when it differs, the key a token minted
/// before 2026-12-04 was stored under (its plain SHA-256): such a token looks like any other of
/// 32 hex digits, so a lookup that misses under the first key tries the second, until those
/// sessions have expired. Both come from one SHA-256.
pub fn session_keys(presented: &str) -> ([u8; 32], Option<[u8; 32]>) {
    let text = presented.trim();
    let plain = hash_token(text);
    let key = time_first(text, plain, SESSION_TOKEN_LEN, SESSION_TIME_HEX);
    (key, (plain != key).then_some(plain))
}

/// `hash` (`text`'s SHA-256) with its first bytes replaced by the time the first `time_hex` hex
/// digits of `text` spell, when `text` is `len` long and they are hex; otherwise `hash` itself.
fn time_first(text: &str, hash: [u8; 32], len: usize, time_hex: usize) -> [u8; 32] {
    let mut time = [0u8; 6];
    let Some(time) = time.get_mut(..time_hex / 2) else {
        return hash;
    };
    let spells_time = text.len() == len
        && text
            .get(..time_hex)
            .is_some_and(|prefix| hex::decode_to_slice(prefix, time).is_ok());
    if !spells_time {
        return hash;
    }
    let mut key = [0u8; 32];
    for (to, from) in key.iter_mut().zip(time.iter().chain(hash.iter())) {
        *to = *from;
    }
    key
}

/// Hex digits of a login ticket's time prefix: its minting time in milliseconds, 48 bits.
const TICKET_TIME_HEX: usize = 12;

/// Length of a login ticket: the time prefix, then 128 random bits.
pub const TICKET_LEN: usize = TICKET_TIME_HEX + 32;

/// The first 48 bits of an ordered key or id: milliseconds since 1970, big-endian, so that
/// keys minted later sort after earlier ones (48 bits hold every time up to the year 9999; one
/// before 1970 counts as 1970).
pub fn time_prefix(now: OffsetDateTime) -> [u8; 6] {
    let ms = (now.unix_timestamp_nanos() / 1_000_000).clamp(0, (1 << 48) - 1) as u64;
    let mut prefix = [0u8; 6];
    prefix.copy_from_slice(&ms.to_be_bytes()[2..]);
    prefix
}

/// A new login ticket: its minting time (12 hex digits) then 128 random bits (32), 44 lowercase
/// hex digits in all. The time is not secret (the client saw the login start); it orders the
/// stored keys (see [`ticket_key`]).
pub fn mint_ticket(now: OffsetDateTime) -> Result<Minted, CoreError> {
    let raw: [u8; 16] = random_bytes()?;
    let text = format!("{}{}", hex::encode(time_prefix(now)), hex::encode(raw));
    let hash = ticket_key(&text);
    Ok(Minted {
        secret: SecretString::from(text),
        hash,
    })
}

/// The stored key of a presented login ticket: the ticket's 6 bytes of time, then the first 26
/// bytes of its SHA-256. Tickets minted close together get keys close together, so the store's
/// index on the key takes each new ticket at its right edge and a ticket confirmed a minute
/// after its login finds its index page among the recently used ones, where a plain hash puts
/// every ticket on a random page (with 200,000 pending tickets, SQLite's writer read 4.7 pages
/// from disk per login with random keys and ids, 1.5 with ordered ones). 208 bits of the hash
/// are still more than any guess can match. A ticket without a time prefix (before 2026-12-04,
/// 32 hex digits, alive for 5 minutes) keys as its SHA-256.
pub fn ticket_key(presented: &str) -> [u8; 32] {
    let text = presented.trim();
    time_first(text, hash_token(text), TICKET_LEN, TICKET_TIME_HEX)
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
    fn session_tokens_are_their_time_then_104_random_bits_in_32_lowercase_hex() {
        let at = time::macros::datetime!(2026-12-04 05:00:00.123 UTC);
        let a = mint_session_token(at).unwrap();
        let b = mint_session_token(at).unwrap();
        let text = a.secret.expose_secret();
        assert_eq!(text.len(), SESSION_TOKEN_LEN);
        assert!(text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        // 1,796,360,400,123 ms after 1970 are 449,090,100,030 steps of 4 ms; modulo 2^24,
        // 0xdb1b3e.
        assert_eq!(&text[..6], "db1b3e");
        assert_eq!(text[..6], b.secret.expose_secret()[..6]);
        assert_ne!(text[6..], b.secret.expose_secret()[6..]);
        assert_eq!(session_key(text), a.hash);
        assert_eq!(session_key(&format!(" {text}\n")), a.hash);
    }

    #[test]
    fn a_session_tokens_key_is_its_time_then_its_hash() {
        let at = time::macros::datetime!(2026-12-04 05:00 UTC);
        let minted = mint_session_token(at).unwrap();
        let text = minted.secret.expose_secret();
        assert_eq!(minted.hash[..3], session_time(at));
        assert_eq!(minted.hash[3..], sha256(text.as_bytes())[..29]);
        // Its legacy key is its plain SHA-256, which a new token is never stored under.
        assert_eq!(
            session_keys(text),
            (minted.hash, Some(sha256(text.as_bytes())))
        );
        assert_eq!(session_keys("not a token").1, None);
    }

    #[test]
    fn keys_of_later_sessions_sort_after_earlier_ones_until_the_count_wraps() {
        let start = time::macros::datetime!(2026-12-04 05:00 UTC);
        let keys: Vec<[u8; 32]> = (0..200)
            .map(|i| {
                mint_session_token(start + time::Duration::milliseconds(4 * i))
                    .unwrap()
                    .hash
            })
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        // The count wraps after 2^24 steps of 4 ms (18.6 hours), longer than a session lives.
        let wrap = time::Duration::milliseconds(4 << 24);
        assert_eq!(session_time(start + wrap), session_time(start));
        assert!(wrap > time::Duration::hours(18));
        let before_1970 = OffsetDateTime::UNIX_EPOCH - time::Duration::milliseconds(4);
        assert_eq!(session_time(before_1970), [0xff; 3]);
    }

    #[test]
    fn tickets_are_their_time_then_128_random_bits_in_lowercase_hex() {
        let at = time::macros::datetime!(2026-12-04 05:00:00.123 UTC);
        let a = mint_ticket(at).unwrap();
        let b = mint_ticket(at).unwrap();
        let text = a.secret.expose_secret();
        assert_eq!(text.len(), TICKET_LEN);
        assert!(text.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')));
        // 2026-12-04T05:00:00.123Z is 1,796,360,400,123 ms after 1970.
        assert_eq!(&text[..12], format!("{:012x}", 1_796_360_400_123_u64));
        assert_ne!(text[12..], b.secret.expose_secret()[12..]);
        assert_eq!(ticket_key(text), a.hash);
        assert_eq!(ticket_key(&format!(" {text}\n")), a.hash);
    }

    #[test]
    fn a_tickets_key_is_its_time_then_its_hash() {
        let at = time::macros::datetime!(2026-12-04 05:00 UTC);
        let minted = mint_ticket(at).unwrap();
        let text = minted.secret.expose_secret();
        assert_eq!(minted.hash[..6], time_prefix(at));
        assert_eq!(minted.hash[6..], sha256(text.as_bytes())[..26]);
        // One changed random digit changes the hashed part, not the time.
        let mut other = text.to_owned().into_bytes();
        other[TICKET_LEN - 1] = if other[TICKET_LEN - 1] == b'0' {
            b'1'
        } else {
            b'0'
        };
        let other = ticket_key(std::str::from_utf8(&other).unwrap());
        assert_eq!(other[..6], minted.hash[..6]);
        assert_ne!(other[6..], minted.hash[6..]);
    }

    #[test]
    fn keys_of_later_tickets_sort_after_earlier_ones() {
        let start = time::macros::datetime!(2026-12-04 05:00 UTC);
        let keys: Vec<[u8; 32]> = (0..200)
            .map(|i| {
                mint_ticket(start + time::Duration::milliseconds(i))
                    .unwrap()
                    .hash
            })
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_ticket_without_a_time_prefix_keys_as_its_plain_hash() {
        // Tickets of earlier versions (32 hex digits) and anything that is not a ticket of ours:
        // looked up by their SHA-256, found or not, never a panic.
        let old = hex::encode(random_bytes::<16>().unwrap());
        assert_eq!(ticket_key(&old), sha256(old.as_bytes()));
        let time_hex = "0194e3a1b2c3";
        let random_hex = "d4e5f60718293a4b5c6d7e8f9a0b1c2d";
        for odd in [
            String::new(),
            format!("zz{}{random_hex}", &time_hex[2..]),
            format!("{time_hex}{random_hex}0"),
            format!("{}{random_hex}", &time_hex[1..]),
            "ابپتثجچحخدذرزژسشصضطظعغفقکگلمنوهی".to_owned(),
        ] {
            assert_eq!(ticket_key(&odd), sha256(odd.as_bytes()), "{odd}");
        }
    }

    #[test]
    fn time_prefixes_are_big_endian_milliseconds_clamped_to_48_bits() {
        assert_eq!(time_prefix(OffsetDateTime::UNIX_EPOCH), [0; 6]);
        let before = OffsetDateTime::UNIX_EPOCH - time::Duration::days(1);
        assert_eq!(time_prefix(before), [0; 6]);
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(0x0102_0304_0506);
        assert_eq!(time_prefix(at), [1, 2, 3, 4, 5, 6]);
        // The last moment `time` can hold still fits, in order.
        let last = time::macros::datetime!(9999-12-31 23:59:59.999 UTC);
        assert!(time_prefix(last) > time_prefix(at) && time_prefix(last) < [0xff; 6]);
    }

    #[test]
    fn api_keys_carry_their_prefix() {
        let key = mint_api_key().unwrap();
        assert!(key.secret.expose_secret().starts_with(API_KEY_PREFIX));
        assert_eq!(key.secret.expose_secret().len(), 4 + 64);
    }
}
