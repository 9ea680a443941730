//! The acl dialect's message catalogues. Persian is the default and carries the document's
//! exact texts; English is chosen by `Accept-Language`. Both catalogues are one `match` each over
//! the same enum, so a message cannot exist in one and be missing in the other, and its
//! `message_code` and HTTP status never depend on the language.

use axum::http::StatusCode;

/// The language of the envelope's texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Persian, the default.
    Fa,
    /// English.
    En,
}

impl Lang {
    /// English when the client's most preferred language is English, else Persian.
    pub fn from_preference(preferred: Option<&str>) -> Self {
        match preferred {
            Some(tag) if tag.to_ascii_lowercase().starts_with("en") => Lang::En,
            _ => Lang::Fa,
        }
    }
}

/// Every message the acl dialect answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AclMessage {
    /// Success.
    Done,
    /// Wrong credentials, ticket or code (deliberately one message for all).
    InvalidCredentials,
    /// A required field is missing or empty.
    Required(String),
    /// A field has the wrong type or format.
    InvalidFormat(String),
    /// The body is not a JSON object.
    MalformedBody,
    /// A final token is needed and was missing, expired or revoked.
    Unauthenticated,
    /// Nothing to act on (no authenticator to confirm or remove).
    NotFound,
    /// Not possible in the current state (an authenticator is already active).
    Conflict,
    /// Too many requests; retry after the given seconds.
    TooManyRequests(u64),
    /// The body is over the limit.
    BodyTooLarge,
    /// Not sent as JSON.
    UnsupportedMediaType,
    /// The database is unreachable.
    Unavailable,
    /// A server fault.
    ServerError,
}

impl AclMessage {
    /// Every kind, for tests that walk the catalogues.
    pub fn samples() -> Vec<AclMessage> {
        vec![
            AclMessage::Done,
            AclMessage::InvalidCredentials,
            AclMessage::Required("otp".into()),
            AclMessage::InvalidFormat("otp".into()),
            AclMessage::MalformedBody,
            AclMessage::Unauthenticated,
            AclMessage::NotFound,
            AclMessage::Conflict,
            AclMessage::TooManyRequests(30),
            AclMessage::BodyTooLarge,
            AclMessage::UnsupportedMediaType,
            AclMessage::Unavailable,
            AclMessage::ServerError,
        ]
    }

    /// The stable `message_code`.
    pub fn code(&self) -> &'static str {
        match self {
            AclMessage::Done => "200-1",
            AclMessage::InvalidCredentials => "400-1",
            AclMessage::Required(_) => "400-2",
            AclMessage::InvalidFormat(_) => "400-3",
            AclMessage::MalformedBody => "400-4",
            AclMessage::Unauthenticated => "401-1",
            AclMessage::NotFound => "404-1",
            AclMessage::Conflict => "409-1",
            AclMessage::BodyTooLarge => "413-1",
            AclMessage::UnsupportedMediaType => "415-1",
            AclMessage::TooManyRequests(_) => "429-1",
            AclMessage::ServerError => "500-1",
            AclMessage::Unavailable => "503-1",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            AclMessage::Done => StatusCode::OK,
            AclMessage::InvalidCredentials | AclMessage::Unauthenticated => {
                StatusCode::UNAUTHORIZED
            }
            AclMessage::Required(_) | AclMessage::InvalidFormat(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            AclMessage::MalformedBody => StatusCode::BAD_REQUEST,
            AclMessage::NotFound => StatusCode::NOT_FOUND,
            AclMessage::Conflict => StatusCode::CONFLICT,
            AclMessage::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            AclMessage::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AclMessage::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AclMessage::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            AclMessage::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The values substituted into the text, in order (`message_parameters`).
    pub fn parameters(&self) -> Vec<serde_json::Value> {
        match self {
            AclMessage::TooManyRequests(seconds) => vec![serde_json::Value::from(*seconds)],
            _ => Vec::new(),
        }
    }

    /// The text in `lang`.
    pub fn text(&self, lang: Lang) -> String {
        match lang {
            Lang::Fa => self.persian(),
            Lang::En => self.english(),
        }
    }

    fn persian(&self) -> String {
        match self {
            AclMessage::Done => "انجام شد".into(),
            AclMessage::InvalidCredentials => "اطلاعات وارد شده صحیح نمی باشد".into(),
            AclMessage::Required(field) => format!("تکمیل گزینه {field} الزامی است"),
            AclMessage::InvalidFormat(field) => format!("فرمت گزینه {field} صحیح نمی باشد"),
            AclMessage::MalformedBody => "بدنه درخواست معتبر نمی باشد".into(),
            AclMessage::Unauthenticated => "برای دسترسی ابتدا وارد شوید".into(),
            AclMessage::NotFound => "مورد درخواستی یافت نشد".into(),
            AclMessage::Conflict => "این عملیات در وضعیت فعلی ممکن نیست".into(),
            AclMessage::TooManyRequests(seconds) => {
                format!("تعداد درخواست ها بیش از حد مجاز است. {seconds} ثانیه دیگر تلاش کنید")
            }
            AclMessage::BodyTooLarge => "حجم درخواست بیش از حد مجاز است".into(),
            AclMessage::UnsupportedMediaType => {
                "درخواست باید با نوع application/json ارسال شود".into()
            }
            AclMessage::Unavailable => "سرویس موقتا در دسترس نیست".into(),
            AclMessage::ServerError => "خطای داخلی سرور".into(),
        }
    }

    fn english(&self) -> String {
        match self {
            AclMessage::Done => "Done".into(),
            AclMessage::InvalidCredentials => "The information entered is not correct".into(),
            AclMessage::Required(field) => format!("The {field} field is required"),
            AclMessage::InvalidFormat(field) => format!("The {field} field has an invalid format"),
            AclMessage::MalformedBody => "The request body is not a valid JSON object".into(),
            AclMessage::Unauthenticated => "Authentication is required".into(),
            AclMessage::NotFound => "Not found".into(),
            AclMessage::Conflict => "This action is not possible in the current state".into(),
            AclMessage::TooManyRequests(seconds) => {
                format!("Too many requests. Try again in {seconds} seconds")
            }
            AclMessage::BodyTooLarge => "The request body is too large".into(),
            AclMessage::UnsupportedMediaType => {
                "The request must be sent as application/json".into()
            }
            AclMessage::Unavailable => "The service is temporarily unavailable".into(),
            AclMessage::ServerError => "Internal server error".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_persian_texts_are_exact() {
        assert_eq!(AclMessage::Done.text(Lang::Fa), "انجام شد");
        assert_eq!(
            AclMessage::InvalidCredentials.text(Lang::Fa),
            "اطلاعات وارد شده صحیح نمی باشد"
        );
        assert_eq!(
            AclMessage::Required("otp".into()).text(Lang::Fa),
            "تکمیل گزینه otp الزامی است"
        );
        assert_eq!(AclMessage::Done.code(), "200-1");
        assert_eq!(
            AclMessage::InvalidCredentials.status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            AclMessage::Required("otp".into()).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn every_message_has_both_texts_and_distinct_codes() {
        let samples = AclMessage::samples();
        let mut codes: Vec<_> = samples.iter().map(AclMessage::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), samples.len());
        for message in samples {
            let (fa, en) = (message.text(Lang::Fa), message.text(Lang::En));
            assert!(!fa.is_empty() && !en.is_empty());
            assert_ne!(fa, en, "{message:?} is not translated");
            assert!(
                fa.chars().any(|c| ('\u{0600}'..='\u{06FF}').contains(&c)),
                "{message:?}: {fa}"
            );
        }
    }

    #[test]
    fn english_is_chosen_only_when_preferred() {
        assert_eq!(Lang::from_preference(Some("en-US")), Lang::En);
        assert_eq!(Lang::from_preference(Some("fa-IR")), Lang::Fa);
        assert_eq!(Lang::from_preference(Some("de")), Lang::Fa);
        assert_eq!(Lang::from_preference(None), Lang::Fa);
    }
}
