//! E-mail over SMTP with `lettre`: STARTTLS, implicit TLS or plain (for a local relay),
//! optional credentials, a plain-text and an HTML body. A permanent SMTP refusal (5xx, such as an
//! unknown recipient) fails the message at once; anything else is retried.

use std::time::Duration;

use async_trait::async_trait;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use otpgate_core::model::{OutboxMessage, Purpose};
use otpgate_core::outbox::{MessageSender, SendError};
use secrecy::{ExposeSecret, SecretString};

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Plain connection upgraded with STARTTLS (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only for a relay on the same host or network.
    None,
}

impl Security {
    /// Parses `starttls`, `tls` or `none`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "starttls" => Some(Security::StartTls),
            "tls" => Some(Security::Tls),
            "none" => Some(Security::None),
            _ => None,
        }
    }
}

/// Settings of the SMTP provider.
#[derive(Debug, Clone)]
pub struct SmtpConfig {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Connection security.
    pub security: Security,
    /// User name, if the server wants one.
    pub username: Option<String>,
    /// Password for `username`.
    pub password: Option<SecretString>,
    /// The sender (`otpgate <no-reply@example.com>`).
    pub from: String,
    /// Time-out of one delivery.
    pub timeout: Duration,
}

/// The SMTP provider.
pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpSender {
    /// An SMTP provider (connections are opened per delivery from a pool).
    pub fn new(config: SmtpConfig) -> Result<Self, String> {
        crate::install_tls_provider();
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| format!("delivery.smtp.from is not an address: {e}"))?;
        let builder = match config.security {
            Security::StartTls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&config.host)
                    .map_err(|e| format!("delivery.smtp.host: {e}"))?
            }
            Security::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&config.host)
                .map_err(|e| format!("delivery.smtp.host: {e}"))?,
            Security::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host),
        };
        let mut builder = builder.port(config.port).timeout(Some(config.timeout));
        if let Some(user) = config.username {
            let password = config
                .password
                .map(|p| p.expose_secret().to_owned())
                .ok_or("delivery.smtp.password is required with delivery.smtp.username")?;
            builder = builder.credentials(Credentials::new(user, password));
        }
        Ok(SmtpSender {
            transport: builder.build(),
            from,
        })
    }
}

fn subject(purpose: Purpose, locale: &str) -> &'static str {
    let login = matches!(purpose, Purpose::Login | Purpose::PhoneLogin);
    match (locale, login) {
        ("fa", true) => "کد ورود",
        ("fa", false) => "کد تأیید",
        (_, true) => "Your login code",
        (_, false) => "Your verification code",
    }
}

fn html(text: &str, locale: &str) -> String {
    let escaped: String = text
        .chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\n' => "<br>".to_owned(),
            other => other.to_string(),
        })
        .collect();
    let dir = if locale == "fa" { "rtl" } else { "ltr" };
    format!(
        "<!doctype html><html lang=\"{locale}\" dir=\"{dir}\"><body><p>{escaped}</p></body></html>"
    )
}

#[async_trait]
impl MessageSender for SmtpSender {
    fn name(&self) -> &str {
        "smtp"
    }

    async fn send(&self, message: &OutboxMessage) -> Result<Option<String>, SendError> {
        let Some(body) = message.body.as_deref() else {
            return Err(SendError::Permanent("message has no body".into()));
        };
        let to: Mailbox = message
            .destination
            .parse()
            .map_err(|_| SendError::Permanent("the recipient is not an e-mail address".into()))?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject(message.purpose, &message.locale))
            .multipart(MultiPart::alternative_plain_html(
                body.to_owned(),
                html(body, &message.locale),
            ))
            .map_err(|e| SendError::Permanent(format!("smtp message: {e}")))?;
        match self.transport.send(email).await {
            Ok(response) => Ok(response.message().next().map(str::to_owned)),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(format!("smtp: {e}"))),
            Err(e) => Err(SendError::Temporary(format!("smtp: {e}"))),
        }
    }
}
