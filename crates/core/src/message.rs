//! The text of outgoing code messages: one template per purpose and locale, with the
//! placeholders `{product}`, `{code}` and `{minutes}`. Templates are checked when they are
//! loaded (a missing `{code}` or an unknown placeholder is refused at start, never at send), and
//! SMS texts count their segments: GSM-7 texts take 160 characters in one segment (153 per part
//! when split), UCS-2 texts such as Persian 70 (67 per part). The default Persian texts fit one.

use std::collections::HashMap;

use crate::error::CoreError;
use crate::model::Purpose;

/// Locales with their own texts; anything else falls back to English.
pub const SUPPORTED_LOCALES: [&str; 2] = ["fa", "en"];

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 3] = ["product", "code", "minutes"];

/// Every purpose, for walking the templates.
pub const PURPOSES: [Purpose; 5] = [
    Purpose::Verify,
    Purpose::Login,
    Purpose::MobileVerify,
    Purpose::EmailVerify,
    Purpose::PhoneLogin,
];

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

/// Checks a template: it must show `{code}` and use no placeholder but [`PLACEHOLDERS`].
pub fn validate_template(text: &str) -> Result<(), String> {
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = rest.get(open + 1..).unwrap_or("");
        let close = after
            .find('}')
            .ok_or_else(|| "has a `{` without its `}`".to_owned())?;
        let name = after.get(..close).unwrap_or("");
        if !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "uses the unknown placeholder {{{name}}} (known: {{product}}, {{code}}, {{minutes}})"
            ));
        }
        rest = after.get(close + 1..).unwrap_or("");
    }
    if !text.contains("{code}") {
        return Err("does not show {code}".into());
    }
    Ok(())
}

fn default_text(purpose: Purpose, locale: &str) -> &'static str {
    let login = matches!(purpose, Purpose::Login | Purpose::PhoneLogin);
    match (locale, login) {
        ("fa", true) => "کد ورود {product}: {code}\nاعتبار: {minutes} دقیقه",
        ("fa", false) => "کد تأیید {product}: {code}\nاعتبار: {minutes} دقیقه",
        (_, true) => "Your {product} login code is {code}. It expires in {minutes} minutes.",
        (_, false) => {
            "Your {product} verification code is {code}. It expires in {minutes} minutes."
        }
    }
}

/// The message templates in force.
#[derive(Debug, Clone)]
pub struct Templates {
    texts: HashMap<(&'static str, String), String>,
}

impl Default for Templates {
    fn default() -> Self {
        let mut texts = HashMap::new();
        for purpose in PURPOSES {
            for locale in SUPPORTED_LOCALES {
                texts.insert(
                    (purpose.as_str(), locale.to_owned()),
                    default_text(purpose, locale).to_owned(),
                );
            }
        }
        Templates { texts }
    }
}

impl Templates {
    /// Replaces the template of `key` (`<purpose>.<locale>`, e.g. `login.fa`), after checking
    /// it; the error names the key and the problem.
    pub fn set(&mut self, key: &str, text: &str) -> Result<(), CoreError> {
        let (purpose, locale) = key.split_once('.').ok_or_else(|| {
            CoreError::invalid("templates", format!("{key}: expected <purpose>.<locale>"))
        })?;
        let purpose = Purpose::parse(purpose).map_err(|_| {
            CoreError::invalid("templates", format!("{key}: unknown purpose {purpose}"))
        })?;
        if !SUPPORTED_LOCALES.contains(&locale) {
            return Err(CoreError::invalid(
                "templates",
                format!("{key}: locale must be fa or en"),
            ));
        }
        validate_template(text)
            .map_err(|why| CoreError::invalid("templates", format!("{key} {why}")))?;
        self.texts
            .insert((purpose.as_str(), locale.to_owned()), text.to_owned());
        Ok(())
    }

    /// The text carrying `code`.
    pub fn render(
        &self,
        product: &str,
        purpose: Purpose,
        locale: &str,
        code: &str,
        minutes: u64,
    ) -> String {
        let template = self
            .texts
            .get(&(purpose.as_str(), locale.to_owned()))
            .map(String::as_str)
            .unwrap_or_else(|| default_text(purpose, locale));
        template
            .replace("{product}", product)
            .replace("{minutes}", &minutes.to_string())
            .replace("{code}", code)
    }
}

/// How an SMS text is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmsEncoding {
    /// The GSM 03.38 default alphabet (7 bits a character).
    Gsm7,
    /// UCS-2 (16 bits a character), for anything outside it.
    Ucs2,
}

const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
const GSM7_EXTENDED: &str = "^{}\\[~]|€\u{000C}";

/// The encoding and number of segments an SMS text takes.
pub fn sms_segments(text: &str) -> (SmsEncoding, usize) {
    let gsm_units: Option<usize> = text
        .chars()
        .map(|c| {
            if GSM7_BASIC.contains(c) {
                Some(1)
            } else if GSM7_EXTENDED.contains(c) {
                Some(2)
            } else {
                None
            }
        })
        .sum();
    let (encoding, units, single, part) = match gsm_units {
        Some(units) => (SmsEncoding::Gsm7, units, 160, 153),
        // UCS-2 counts UTF-16 code units.
        None => (SmsEncoding::Ucs2, text.encode_utf16().count(), 70, 67),
    };
    let segments = if units <= single {
        1
    } else {
        units.div_ceil(part)
    };
    (encoding, segments)
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
    fn every_default_persian_text_fits_one_ucs2_segment() {
        let templates = Templates::default();
        for purpose in PURPOSES {
            let text = templates.render("otpgate", purpose, "fa", "12345678", 10);
            assert_eq!(sms_segments(&text), (SmsEncoding::Ucs2, 1), "{text}");
            let english = templates.render("otpgate", purpose, "en", "123456", 5);
            assert_eq!(sms_segments(&english), (SmsEncoding::Gsm7, 1), "{english}");
        }
    }

    #[test]
    fn segments_are_counted_per_encoding() {
        assert_eq!(sms_segments(&"a".repeat(160)), (SmsEncoding::Gsm7, 1));
        assert_eq!(sms_segments(&"a".repeat(161)), (SmsEncoding::Gsm7, 2));
        assert_eq!(sms_segments(&"€".repeat(80)), (SmsEncoding::Gsm7, 1));
        assert_eq!(sms_segments(&"ب".repeat(70)), (SmsEncoding::Ucs2, 1));
        assert_eq!(sms_segments(&"ب".repeat(71)), (SmsEncoding::Ucs2, 2));
        assert_eq!(sms_segments(&"ب".repeat(135)), (SmsEncoding::Ucs2, 3));
    }

    #[test]
    fn templates_with_a_missing_or_unknown_placeholder_are_refused() {
        let mut templates = Templates::default();
        assert!(
            templates
                .set("login.en", "Code: {code} for {product}")
                .is_ok()
        );
        assert_eq!(
            templates.render("X", Purpose::Login, "en", "123456", 5),
            "Code: 123456 for X"
        );
        for (key, text) in [
            ("login.en", "no code here"),
            ("login.en", "{code} {name}"),
            ("login.en", "{code"),
            ("login.de", "{code}"),
            ("logout.en", "{code}"),
        ] {
            assert!(templates.set(key, text).is_err(), "{key}: {text}");
        }
    }
}
