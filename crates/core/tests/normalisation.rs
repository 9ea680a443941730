//! Property tests for what people type: codes and phone numbers in any digit script, with any
//! spacing, normalise to one form; anything else is refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use otpgate_core::code::OtpCode;
use otpgate_core::identity::E164Phone;
use otpgate_core::service::normalize_phone;
use proptest::prelude::*;

/// A digit written in ASCII, Persian or Arabic-Indic.
fn in_script(digit: u32, script: u8) -> char {
    match script % 3 {
        0 => char::from_digit(digit, 10).unwrap(),
        1 => char::from_u32(0x06F0 + digit).unwrap(),
        _ => char::from_u32(0x0660 + digit).unwrap(),
    }
}

proptest! {
    #[test]
    fn a_code_in_any_script_with_surrounding_space_normalises(
        digits in proptest::collection::vec(0u32..10, 6),
        scripts in proptest::collection::vec(any::<u8>(), 6),
        before in "[ \t\n]{0,3}",
        after in "[ \t\n]{0,3}",
    ) {
        let ascii: String = digits.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect();
        let typed: String = digits.iter().zip(&scripts).map(|(d, s)| in_script(*d, *s)).collect();
        let parsed = OtpCode::parse(&format!("{before}{typed}{after}"), Some(6)).unwrap();
        prop_assert_eq!(parsed.expose(), ascii.as_str());
    }

    #[test]
    fn a_code_with_anything_but_digits_inside_or_the_wrong_length_is_refused(
        digits in "[0-9]{6}",
        position in 1usize..6,
        intruder in "[^0-9\u{06F0}-\u{06F9}\u{0660}-\u{0669}]",
        length in (0usize..12).prop_filter("not 6", |n| *n != 6),
    ) {
        let mut broken: Vec<char> = digits.chars().collect();
        broken.insert(position, intruder.chars().next().unwrap());
        let broken: String = broken.into_iter().collect();
        prop_assert!(OtpCode::parse(&broken, Some(6)).is_err(), "{broken:?} accepted");
        prop_assert!(OtpCode::parse(&"7".repeat(length), Some(6)).is_err());
    }

    #[test]
    fn international_numbers_with_any_separators_normalise_to_e164(
        first in 1u32..10,
        rest in proptest::collection::vec(0u32..10, 7..14),
        separators in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("-"), Just(".")], 14),
        persian in any::<bool>(),
    ) {
        let digits: Vec<u32> = std::iter::once(first).chain(rest.iter().copied()).collect();
        let expected: String = std::iter::once('+').chain(digits.iter().map(|d| char::from_digit(*d, 10).unwrap())).collect();
        let mut typed = String::from("+");
        for (i, d) in digits.iter().enumerate() {
            typed.push(in_script(*d, if persian { 1 } else { 0 }));
            typed.push_str(separators[i % separators.len()]);
        }
        let parsed = E164Phone::parse(&typed).unwrap();
        prop_assert_eq!(parsed.as_str(), expected.as_str());
        // Normalising twice changes nothing.
        prop_assert_eq!(E164Phone::parse(parsed.as_str()).unwrap(), parsed);
    }

    #[test]
    fn a_national_number_with_a_leading_zero_and_dashes_joins_its_dial_code(
        country in 1u32..999,
        national in proptest::collection::vec(0u32..10, 7..11),
        zero in any::<bool>(),
    ) {
        prop_assume!(national[0] != 0);
        let digits: String = national.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect();
        let typed = format!("{}{}-{}", if zero { "0" } else { "" }, &digits[..3], &digits[3..]);
        let total = country.to_string().len() + digits.len();
        let result = normalize_phone(&format!("+{country}"), &typed);
        if (8..=15).contains(&total) {
            let phone = result.unwrap();
            prop_assert_eq!(phone.as_str(), format!("+{country}{digits}"));
        } else {
            prop_assert!(result.is_err());
        }
    }

    #[test]
    fn garbage_never_parses_as_a_phone_number(text in "\\PC{0,20}") {
        if let Ok(phone) = E164Phone::parse(&text) {
            let digits = &phone.as_str()[1..];
            prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
            prop_assert!((8..=15).contains(&digits.len()) && !digits.starts_with('0'));
        }
    }
}
