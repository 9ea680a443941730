//! Parsed identities: usernames, e-mail addresses and E.164 phone numbers. Each constructor is
//! the only way in, so a value of these types is valid by construction.

use crate::code::normalize_digit;
use crate::error::CoreError;

/// A username: 1 to 64 characters, no white space or control characters, compared lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// Parses and lowercases a username.
    pub fn parse(input: &str) -> Result<Self, CoreError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(CoreError::invalid("username", "is required"));
        }
        if trimmed.chars().count() > 64 {
            return Err(CoreError::invalid(
                "username",
                "must be at most 64 characters",
            ));
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CoreError::invalid("username", "must not contain spaces"));
        }
        Ok(Username(
            trimmed
                .chars()
                .map(normalize_digit)
                .collect::<String>()
                .to_lowercase(),
        ))
    }

    /// The normalised text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An e-mail address of practical shape (RFC 5321 lengths, a dotted domain), domain lowercased.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// Parses an address.
    pub fn parse(input: &str) -> Result<Self, CoreError> {
        let bad = || CoreError::invalid("email", "is not a valid e-mail address");
        let trimmed = input.trim();
        if trimmed.len() > 254 {
            return Err(bad());
        }
        let (local, domain) = trimmed.rsplit_once('@').ok_or_else(bad)?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.contains('@')
            && local.chars().all(|c| c.is_ascii_graphic() || !c.is_ascii())
            && !local.chars().any(|c| c.is_whitespace() || c.is_control());
        let labels: Vec<&str> = domain.split('.').collect();
        let domain_ok = labels.len() >= 2
            && labels.iter().all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !local_ok || !domain_ok {
            return Err(bad());
        }
        Ok(Email(format!("{local}@{}", domain.to_ascii_lowercase())))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A phone number in E.164 form: `+`, then 8 to 15 digits, the first not zero.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct E164Phone(String);

impl E164Phone {
    /// Parses a number written in international form (`+98 912 345 6789`, `0098…`), with
    /// Persian or Arabic-Indic digits, spaces, dashes, dots and parentheses allowed.
    pub fn parse(input: &str) -> Result<Self, CoreError> {
        let bad = || {
            CoreError::invalid(
                "phone",
                "is not a valid phone number in international form (+ and 8 to 15 digits)",
            )
        };
        let mut digits = String::new();
        let mut plus = false;
        for (i, c) in input.trim().chars().map(normalize_digit).enumerate() {
            match c {
                '+' if i == 0 => plus = true,
                '0'..='9' => digits.push(c),
                ' ' | '-' | '.' | '(' | ')' | '\u{00A0}' => {}
                _ => return Err(bad()),
            }
        }
        let national = if plus {
            digits.as_str()
        } else if let Some(rest) = digits.strip_prefix("00") {
            rest
        } else {
            return Err(bad());
        };
        if !(8..=15).contains(&national.len()) || national.starts_with('0') {
            return Err(bad());
        }
        Ok(E164Phone(format!("+{national}")))
    }

    /// The number, `+` and digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The country calling code with its `+` (`+1`, `+98`, `+358`), by the ITU's zone plan:
    /// zones 1 and 7 are one digit, a fixed set of two-digit codes, three digits otherwise.
    pub fn country_prefix(&self) -> &str {
        const TWO_DIGIT: [&str; 44] = [
            "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45",
            "46", "47", "48", "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61",
            "62", "63", "64", "65", "66", "81", "82", "84", "86", "90", "91", "92", "93", "94",
            "95", "98",
        ];
        let digits = self.0.get(1..).unwrap_or("");
        let len = if digits.starts_with('1') || digits.starts_with('7') {
            1
        } else if TWO_DIGIT.iter().any(|p| digits.starts_with(p)) {
            2
        } else {
            3
        };
        self.0.get(..=len).unwrap_or(&self.0)
    }

    /// The country calling code and the first `national_digits` digits after it (`+98912`):
    /// the unit the SMS pumping circuit breaker judges, an operator's or an area's range.
    pub fn range_prefix(&self, national_digits: u8) -> &str {
        let end = self.country_prefix().len() + usize::from(national_digits);
        self.0.get(..end.min(self.0.len())).unwrap_or(&self.0)
    }

    /// What the number plan (libphonenumber's metadata) says this number is.
    ///
    /// libphonenumber's own entry point would parse the number again (16 of the 18 µs this
    /// took on every send): the number is already in E.164 form, so its country code and
    /// national number are read off it and only the plan's patterns are matched, in the order
    /// and with the choice of region that the crate's `number_type` uses.
    pub fn line_type(&self) -> LineType {
        let country = self.country_prefix();
        let national = self.0.get(country.len()..).unwrap_or("");
        let Some(code) = country.get(1..).and_then(|c| c.parse::<u16>().ok()) else {
            return LineType::Unknown;
        };
        line_type_under(code, national)
    }
}

/// The line type of `national` in the plan that holds it under the country code `code`: the
/// code's only region, or the first of its regions (the NANP's, say) whose leading digits, or
/// else whose patterns, take the number. A plan chosen by its patterns has already said what
/// the number is: its patterns are not matched a second time.
fn line_type_under(code: u16, national: &str) -> LineType {
    let plans: &'static phonenumber::metadata::Database = &phonenumber::metadata::DATABASE;
    let Some(regions) = plans.region(&code) else {
        return LineType::Unknown;
    };
    if let [only] = regions.as_slice() {
        let plan = if *only == "001" {
            plans.by_code(&code).and_then(|p| p.into_iter().next())
        } else {
            plans.by_id(*only)
        };
        return plan.map_or(LineType::Unknown, |plan| line_type_in(plan, national));
    }
    for plan in regions.into_iter().filter_map(|region| plans.by_id(region)) {
        match plan.leading_digits() {
            Some(leading) => {
                if leading.find(national).is_some_and(|m| m.start() == 0) {
                    return line_type_in(plan, national);
                }
            }
            None => {
                let kind = line_type_in(plan, national);
                if kind != LineType::Unknown {
                    return kind;
                }
            }
        }
    }
    LineType::Unknown
}

/// The first of the plan's kinds whose pattern takes `national`, in libphonenumber's order
/// (the costly kinds first; a fixed-line pattern that a mobile one also takes, or shares,
/// cannot tell the two apart).
fn line_type_in(plan: &phonenumber::Metadata, national: &str) -> LineType {
    let kinds = plan.descriptors();
    let takes = |kind: Option<&phonenumber::metadata::Descriptor>| {
        kind.is_some_and(|d| d.is_match(national))
    };
    if !kinds.general().is_match(national) {
        return LineType::Unknown;
    }
    let ordered = [
        (kinds.premium_rate(), LineType::PremiumRate),
        (kinds.toll_free(), LineType::TollFree),
        (kinds.shared_cost(), LineType::SharedCost),
        (kinds.voip(), LineType::Voip),
        (kinds.personal_number(), LineType::Personal),
        (kinds.pager(), LineType::Pager),
        (kinds.uan(), LineType::Uan),
        (kinds.voicemail(), LineType::Voicemail),
    ];
    if let Some((_, kind)) = ordered.into_iter().find(|(d, _)| takes(*d)) {
        return kind;
    }
    if takes(kinds.fixed_line()) {
        let same_pattern = kinds.fixed_line().map(|d| d.national_number().as_str())
            == kinds.mobile().map(|d| d.national_number().as_str());
        return if same_pattern || takes(kinds.mobile()) {
            LineType::FixedLineOrMobile
        } else {
            LineType::FixedLine
        };
    }
    if takes(kinds.mobile()) {
        LineType::Mobile
    } else {
        LineType::Unknown
    }
}

/// The kind of line a number plan assigns a number to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineType {
    /// A mobile phone.
    Mobile,
    /// Mobile or fixed: the plan cannot tell (the NANP, +1).
    FixedLineOrMobile,
    /// A personal number routed to a phone of the owner's choice.
    Personal,
    /// Voice over IP.
    Voip,
    /// A landline.
    FixedLine,
    /// Freephone.
    TollFree,
    /// Shared cost.
    SharedCost,
    /// Premium rate: the sender pays the receiver, what SMS pumping lives on.
    PremiumRate,
    /// A company's universal access number.
    Uan,
    /// Voicemail access.
    Voicemail,
    /// A pager.
    Pager,
    /// Outside every range the plan knows (or a plan the metadata lacks).
    Unknown,
}

impl LineType {
    /// Its name in logs, audit events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LineType::Mobile => "mobile",
            LineType::FixedLineOrMobile => "fixed_line_or_mobile",
            LineType::Personal => "personal",
            LineType::Voip => "voip",
            LineType::FixedLine => "fixed_line",
            LineType::TollFree => "toll_free",
            LineType::SharedCost => "shared_cost",
            LineType::PremiumRate => "premium_rate",
            LineType::Uan => "uan",
            LineType::Voicemail => "voicemail",
            LineType::Pager => "pager",
            LineType::Unknown => "unknown",
        }
    }

    /// Whether an SMS can reach such a line at all. Unknown ranges pass: the plan's metadata
    /// lags new mobile ranges, and refusing them would lock real users out.
    pub fn takes_sms(self) -> bool {
        matches!(
            self,
            LineType::Mobile
                | LineType::FixedLineOrMobile
                | LineType::Personal
                | LineType::Voip
                | LineType::Unknown
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_normalised_to_e164() {
        assert_eq!(
            E164Phone::parse("+98 912 345-6789").unwrap().as_str(),
            "+989123456789"
        );
        assert_eq!(
            E164Phone::parse("0098 (912) 3456789").unwrap().as_str(),
            "+989123456789"
        );
        assert_eq!(
            E164Phone::parse("+۹۸۹۱۲۳۴۵۶۷۸۹").unwrap().as_str(),
            "+989123456789"
        );
    }

    #[test]
    fn country_prefixes_follow_the_zone_plan() {
        for (number, prefix) in [
            ("+14155550100", "+1"),
            ("+79161234567", "+7"),
            ("+989121234567", "+98"),
            ("+447911123456", "+44"),
            ("+358401234567", "+358"),
            ("+9715012345678", "+971"),
        ] {
            assert_eq!(
                E164Phone::parse(number).unwrap().country_prefix(),
                prefix,
                "{number}"
            );
        }
    }

    #[test]
    fn line_types_follow_the_number_plan() {
        for (number, kind) in [
            ("+989121234567", LineType::Mobile),
            ("+447911123456", LineType::Mobile),
            ("+442079460000", LineType::FixedLine),
            ("+449012345678", LineType::PremiumRate),
            ("+19002345678", LineType::PremiumRate),
            ("+18002345678", LineType::TollFree),
            ("+78001234567", LineType::TollFree),
            // National numbers that begin with 0 keep it (Italy's landlines, Côte d'Ivoire's
            // and Gabon's mobiles): the plans' patterns include it.
            ("+390212345678", LineType::FixedLine),
            ("+2250123456789", LineType::Mobile),
            ("+24106031234", LineType::Mobile),
            ("+14155550100", LineType::FixedLineOrMobile),
        ] {
            assert_eq!(
                E164Phone::parse(number).unwrap().line_type(),
                kind,
                "{number}"
            );
        }
        assert!(!LineType::PremiumRate.takes_sms());
        assert!(!LineType::FixedLine.takes_sms());
        assert!(LineType::Unknown.takes_sms());
    }

    #[test]
    fn line_types_agree_with_libphonenumbers_parse_on_every_example_of_the_plan() {
        // The plans' own example numbers, of every kind and region, classified both ways: ours
        // from the E.164 digits, the crate's after its full parse.
        let theirs = |number: &str| {
            use phonenumber::Type;
            let parsed = phonenumber::parse(None, number).ok()?;
            let national = parsed.national().value();
            Some((
                national,
                match parsed.number_type(&phonenumber::metadata::DATABASE) {
                    Type::Mobile => LineType::Mobile,
                    Type::FixedLineOrMobile => LineType::FixedLineOrMobile,
                    Type::PersonalNumber => LineType::Personal,
                    Type::Voip => LineType::Voip,
                    Type::FixedLine => LineType::FixedLine,
                    Type::TollFree => LineType::TollFree,
                    Type::SharedCost => LineType::SharedCost,
                    Type::PremiumRate => LineType::PremiumRate,
                    Type::Uan => LineType::Uan,
                    Type::Voicemail => LineType::Voicemail,
                    Type::Pager => LineType::Pager,
                    _ => LineType::Unknown,
                },
            ))
        };
        let mut compared = 0;
        let mut differ = Vec::new();
        for plan in phonenumber::metadata::DATABASE.iter() {
            let kinds = plan.descriptors();
            let examples = [
                kinds.fixed_line(),
                kinds.mobile(),
                kinds.toll_free(),
                kinds.premium_rate(),
                kinds.shared_cost(),
                kinds.personal_number(),
                kinds.voip(),
                kinds.pager(),
                kinds.uan(),
                kinds.voicemail(),
            ]
            .into_iter()
            .flatten()
            .filter_map(|d| d.example());
            for example in examples {
                // The crate reads a national number as an integer: leading zeros (Italy's,
                // say) are not its to compare.
                if example.starts_with('0') {
                    continue;
                }
                let number = format!("+{}{example}", plan.country_code());
                let Ok(phone) = E164Phone::parse(&number) else {
                    continue;
                };
                // The crate also strips a national prefix from some international numbers
                // (Russia's 8 from +7 800…, which libphonenumber keeps): there it judged
                // another number.
                let Some((national, expected)) = theirs(&number) else {
                    continue;
                };
                if example.parse::<u64>().ok() != Some(national) {
                    continue;
                }
                compared += 1;
                if phone.line_type() != expected {
                    differ.push(format!(
                        "{number}: {:?} against {expected:?}",
                        phone.line_type()
                    ));
                }
            }
        }
        assert!(compared > 1000, "only {compared} examples compared");
        assert!(differ.is_empty(), "{} differ: {differ:?}", differ.len());
    }

    #[test]
    fn range_prefixes_extend_the_country_code() {
        let phone = E164Phone::parse("+989121234567").unwrap();
        assert_eq!(phone.range_prefix(3), "+98912");
        assert_eq!(phone.range_prefix(0), "+98");
        assert_eq!(phone.range_prefix(40), "+989121234567");
        assert_eq!(
            E164Phone::parse("+14155550100").unwrap().range_prefix(3),
            "+1415"
        );
    }

    #[test]
    fn malformed_phones_are_refused() {
        for bad in [
            "",
            "09123456789",
            "+0123456789",
            "+12",
            "+1234567890123456",
            "+98abc1234567",
            "+98+912",
        ] {
            assert!(E164Phone::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn emails_are_checked_and_domain_lowercased() {
        assert_eq!(
            Email::parse(" Ali@Example.COM ").unwrap().as_str(),
            "Ali@example.com"
        );
        for bad in [
            "",
            "ali",
            "ali@",
            "@x.com",
            "ali@localhost",
            "a b@x.com",
            "ali@x..com",
            "ali@-x.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn usernames_are_lowercased_and_refuse_spaces() {
        assert_eq!(Username::parse(" Ali ").unwrap().as_str(), "ali");
        assert!(Username::parse("a b").is_err());
        assert!(Username::parse("").is_err());
    }
}
