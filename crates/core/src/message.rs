//! The text of outgoing code messages, per locale. Short enough for one SMS segment in both
//! Persian (UCS-2, 70 characters) and English (GSM-7, 160 characters).

use crate::model::Purpose;

/// Locales with their own texts; anything else falls back to English.
pub const SUPPORTED_LOCALES: [&str; 2] = ["fa", "en"];

/// Normalises a requested locale (`fa-IR` → `fa`); unknown ones become `en`.
pub fn normalize_locale(requested: Option<&str>) -> String {
    let primary = requested
        .unwrap_or("en")
        .split(['-', '_'])
        .next()
        .unwrap_or("en")
        .to_ascii_lowercase();
    if SUPPORTED_LOCALES.contains(&primary.as_str()) {
        primary
    } else {
        "en".to_owned()
    }
}

/// The text carrying `code`.
pub fn render_code_message(
    product: &str,
    purpose: Purpose,
    locale: &str,
    code: &str,
    ttl_minutes: u64,
) -> String {
    match locale {
        "fa" => {
            let what = match purpose {
                Purpose::Login | Purpose::PhoneLogin => "ورود",
                Purpose::MobileVerify | Purpose::EmailVerify | Purpose::Verify => "تأیید",
            };
            format!("کد {what} {product}: {code}\nاعتبار: {ttl_minutes} دقیقه")
        }
        _ => {
            let what = match purpose {
                Purpose::Login | Purpose::PhoneLogin => "login",
                Purpose::MobileVerify | Purpose::EmailVerify | Purpose::Verify => "verification",
            };
            format!("Your {product} {what} code is {code}. It expires in {ttl_minutes} minutes.")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_fall_back_to_english() {
        assert_eq!(normalize_locale(Some("fa-IR")), "fa");
        assert_eq!(normalize_locale(Some("de")), "en");
        assert_eq!(normalize_locale(None), "en");
    }

    #[test]
    fn persian_text_fits_one_ucs2_segment() {
        let text = render_code_message("otpgate", Purpose::Login, "fa", "123456", 5);
        assert!(text.chars().count() <= 70, "{} chars", text.chars().count());
        assert!(text.contains("123456"));
    }
}
