//! What the HTTP providers share: a client with a time-out, and the rule that tells a failure
//! worth retrying from one that is not.

use std::time::Duration;

use otpgate_core::outbox::SendError;
use reqwest::StatusCode;

/// A client for provider calls: bounded by `timeout`, no redirects (a provider that redirects
/// is misconfigured, and following would resend credentials elsewhere).
pub(crate) fn client(timeout: Duration) -> Result<reqwest::Client, String> {
    crate::install_tls_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// A transport failure (time-out, refused, reset): worth retrying. The URL is dropped from
/// the text, as some providers carry credentials in it.
pub(crate) fn transport(provider: &str, e: reqwest::Error) -> SendError {
    SendError::Temporary(format!("{provider}: {}", e.without_url()))
}

/// Sorts a non-success status: 408, 425, 429 and 5xx may pass later; any other answer will not.
pub(crate) fn status(provider: &str, code: StatusCode) -> SendError {
    let text = format!("{provider} answered {code}");
    if code.is_server_error()
        || code == StatusCode::REQUEST_TIMEOUT
        || code == StatusCode::TOO_EARLY
        || code == StatusCode::TOO_MANY_REQUESTS
    {
        SendError::Temporary(text)
    } else {
        SendError::Permanent(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_retryable_statuses_are_temporary() {
        for code in [500, 502, 503, 408, 429] {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            assert!(
                matches!(status("p", code), SendError::Temporary(_)),
                "{code}"
            );
        }
        for code in [400, 401, 403, 404, 422, 301] {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            assert!(
                matches!(status("p", code), SendError::Permanent(_)),
                "{code}"
            );
        }
    }
}
