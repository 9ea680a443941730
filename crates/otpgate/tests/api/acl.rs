//! The acl dialect against its document: whole bodies compared (tokens masked), every method's
//! full flow, every error, and single use under concurrency.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{masked, spawn_app, wrong_code};

const PHONE: &str = "+989121234567";
const PASSWORD: &str = "correct horse battery";

fn invalid_401() -> serde_json::Value {
    json!({
        "data": null,
        "meta": {
            "status": false,
            "message": "اطلاعات وارد شده صحیح نمی باشد",
            "message_parameters": [],
            "message_code": "400-1",
            "errors": {}
        }
    })
}

#[tokio::test]
async fn confirm_otp_answers_the_documented_success_body_and_a_ten_hour_token() {
    // Arrange
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let step1 = app.acl_login("ali", PASSWORD).await;
    // Assert step 1
    assert_eq!(step1.status, 200);
    assert_eq!(
        masked(
            step1.body.clone(),
            &["/data/token", "/data/expires_at", "/data/resend_at"]
        ),
        json!({
            "data": {"token": "<masked>", "method": "sms", "expires_at": "<masked>", "expires_in": 300, "resend_at": "<masked>"},
            "meta": {"status": true, "message": "انجام شد", "message_parameters": [], "message_code": "200-1"}
        })
    );
    let ticket = step1.body["data"]["token"].as_str().unwrap();
    let code = app.delivered_code(PHONE, 1).await;
    // Act
    let step2 = app.acl_confirm(ticket, &code).await;
    // Assert: the document's body exactly, the token 32 lowercase hex, valid for 10 hours.
    assert_eq!(step2.status, 200);
    assert_eq!(
        masked(step2.body.clone(), &["/data/token"]),
        json!({
            "data": {"token": "<masked>", "method": "login"},
            "meta": {"status": true, "message": "انجام شد", "message_parameters": [], "message_code": "200-1"}
        })
    );
    let token = step2.body["data"]["token"].as_str().unwrap();
    assert!(
        token.len() == 32
            && token
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );
    app.clock.advance(Duration::from_secs(10 * 3600 - 1));
    assert_eq!(
        app.acl_get("me", Some(&format!("Bearer {token}")))
            .await
            .status,
        200
    );
    app.clock.advance(Duration::from_secs(1));
    assert_eq!(
        app.acl_get("me", Some(&format!("Bearer {token}")))
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn wrong_unknown_and_locked_logins_answer_the_same_401() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let wrong = app.acl_login("ali", "nope").await;
    let unknown = app.acl_login("nobody", PASSWORD).await;
    for _ in 0..9 {
        app.acl_login("ali", "nope").await;
    }
    let locked = app.acl_login("ali", PASSWORD).await;
    for answer in [&wrong, &unknown, &locked] {
        assert_eq!((answer.status, &answer.body), (401, &invalid_401()));
    }
    assert!(
        app.sender.messages().is_empty(),
        "a code was sent for a failed login"
    );
}

#[tokio::test]
async fn invalid_tickets_and_codes_answer_401_and_the_last_wrong_code_kills_the_ticket() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let right = app.delivered_code(PHONE, 1).await;
    let unknown = app
        .acl_confirm("0123456789abcdef0123456789abcdef", &right)
        .await;
    assert_eq!((unknown.status, &unknown.body), (401, &invalid_401()));
    for _ in 0..5 {
        let wrong = app.acl_confirm(&ticket, &wrong_code(&right)).await;
        assert_eq!((wrong.status, &wrong.body), (401, &invalid_401()));
    }
    let dead = app.acl_confirm(&ticket, &right).await;
    assert_eq!((dead.status, &dead.body), (401, &invalid_401()));
}

#[tokio::test]
async fn an_expired_ticket_answers_401() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    app.clock.advance(Duration::from_secs(301));
    assert_eq!(app.acl_confirm(&ticket, &code).await.body, invalid_401());
}

#[tokio::test]
async fn missing_or_empty_fields_answer_422_naming_each_field() {
    let app = spawn_app().await;
    let missing_otp = app.acl("confirm_otp", json!({"token": "abc"})).await;
    assert_eq!(missing_otp.status, 422);
    assert_eq!(
        missing_otp.body,
        json!({
            "data": null,
            "meta": {
                "status": false,
                "message": "تکمیل گزینه otp الزامی است",
                "message_parameters": [],
                "message_code": "400-2",
                "errors": {"otp": ["تکمیل گزینه otp الزامی است"]}
            }
        })
    );
    let both = app
        .acl("confirm_otp", json!({"token": "", "otp": "  "}))
        .await;
    assert_eq!(both.status, 422);
    assert_eq!(
        both.body["meta"]["errors"],
        json!({"token": ["تکمیل گزینه token الزامی است"], "otp": ["تکمیل گزینه otp الزامی است"]})
    );
    let login = app.acl("login", json!({})).await;
    assert_eq!(login.body["meta"]["errors"].as_object().unwrap().len(), 2);
}

#[tokio::test]
async fn english_is_answered_when_preferred_with_the_same_codes() {
    let app = spawn_app().await;
    let answer = app
        .send(
            app.client
                .post(app.url("/api/acl/auth/confirm_otp"))
                .header("accept-language", "en-US,en;q=0.9,fa;q=0.5")
                .json(&json!({"token": "x"})),
        )
        .await;
    assert_eq!(answer.status, 422);
    assert_eq!(answer.body["meta"]["message"], "The otp field is required");
    assert_eq!(answer.body["meta"]["message_code"], "400-2");
    let invalid = app
        .send(
            app.client
                .post(app.url("/api/acl/auth/login"))
                .header("accept-language", "en")
                .json(&json!({"username": "x", "password": "y"})),
        )
        .await;
    assert_eq!(
        invalid.body["meta"]["message"],
        "The information entered is not correct"
    );
    assert_eq!(invalid.body["meta"]["message_code"], "400-1");
}

#[tokio::test]
async fn malformed_bodies_get_acl_shaped_errors() {
    let app = spawn_app().await;
    let url = app.url("/api/acl/auth/login");
    let not_json = app
        .send(
            app.client
                .post(&url)
                .header("content-type", "application/json")
                .body("{"),
        )
        .await;
    assert_eq!(
        (
            not_json.status,
            not_json.body["meta"]["message_code"].as_str()
        ),
        (400, Some("400-4"))
    );
    let text = app
        .send(
            app.client
                .post(&url)
                .header("content-type", "text/plain")
                .body("{}"),
        )
        .await;
    assert_eq!(
        (text.status, text.body["meta"]["message_code"].as_str()),
        (415, Some("415-1"))
    );
    let array = app.send(app.client.post(&url).json(&json!([1, 2]))).await;
    assert_eq!(array.status, 400);
    let numeric = app
        .acl("confirm_otp", json!({"token": "x", "otp": 123456}))
        .await;
    assert_eq!(
        (
            numeric.status,
            numeric.body["meta"]["message_code"].as_str()
        ),
        (422, Some("400-3"))
    );
    let huge = app
        .send(
            app.client
                .post(&url)
                .json(&json!({"username": "x".repeat(70_000), "password": "y"})),
        )
        .await;
    assert_eq!(
        (huge.status, huge.body["meta"]["message_code"].as_str()),
        (413, Some("413-1"))
    );
    // Every other path under /api/acl, and a known path asked with another method, answers
    // in the acl's envelope.
    for (method, path) in [
        (reqwest::Method::GET, "/api/acl/nothing"),
        (reqwest::Method::GET, "/api/acl"),
        (reqwest::Method::GET, "/api/acl/"),
        (reqwest::Method::POST, "/api/acl/auth"),
        (reqwest::Method::GET, "/api/acl/auth/confirm_otp"),
        (reqwest::Method::DELETE, "/api/acl/auth/login"),
        (reqwest::Method::POST, "/api/acl/auth/login/"),
    ] {
        let unknown = app
            .send(app.client.request(method.clone(), app.url(path)))
            .await;
        assert_eq!(
            (
                unknown.status,
                unknown.body["meta"]["message_code"].as_str()
            ),
            (404, Some("404-1")),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_code_with_letters_is_refused_before_any_attempt_counts() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    for _ in 0..6 {
        let bad = app.acl_confirm(&ticket, "12ab56").await;
        assert_eq!(
            (bad.status, bad.body["meta"]["message_code"].as_str()),
            (422, Some("400-3"))
        );
        assert_eq!(
            bad.body["meta"]["errors"]["otp"][0],
            "فرمت گزینه otp صحیح نمی باشد"
        );
    }
    let persian: String = code
        .chars()
        .map(|c| char::from_u32(0x06F0 + c.to_digit(10).unwrap()).unwrap())
        .collect();
    assert_eq!(app.acl_confirm(&ticket, &persian).await.status, 200);
}

#[tokio::test]
async fn twenty_concurrent_confirms_with_the_right_code_give_exactly_one_200() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    let answers =
        futures_util::future::join_all((0..20).map(|_| app.acl_confirm(&ticket, &code))).await;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.status == 401 && a.body == invalid_401())
        .count();
    assert_eq!((ok, refused), (1, 19));
}

#[tokio::test]
async fn the_email_method_is_used_when_the_user_has_no_phone() {
    let app = spawn_app().await;
    app.create_user("sara", PASSWORD, Some("sara@example.com"), None)
        .await;
    let step1 = app.acl_login("sara", PASSWORD).await;
    assert_eq!(step1.body["data"]["method"], "email");
    let code = app.delivered_code("sara@example.com", 1).await;
    let step2 = app
        .acl_confirm(step1.body["data"]["token"].as_str().unwrap(), &code)
        .await;
    assert_eq!(step2.status, 200);
}

#[tokio::test]
async fn resend_gives_a_new_code_within_the_cooldown() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = app.delivered_code(PHONE, 1).await;
    let early = app.acl("resend_otp", json!({"token": ticket})).await;
    assert_eq!(early.status, 429);
    assert_eq!(early.body["meta"]["message_code"], "429-1");
    assert_eq!(early.body["meta"]["message_parameters"], json!([30]));
    assert_eq!(early.headers["retry-after"], "30");
    app.clock.advance(Duration::from_secs(30));
    let resent = app.acl("resend_otp", json!({"token": ticket})).await;
    assert_eq!(resent.status, 200, "{:?}", resent.body);
    assert_eq!(resent.body["data"]["retry_after"], 30);
    let second = app.delivered_code(PHONE, 2).await;
    if first != second {
        assert_eq!(app.acl_confirm(&ticket, &first).await.status, 401);
    }
    assert_eq!(app.acl_confirm(&ticket, &second).await.status, 200);
}

#[tokio::test]
async fn me_and_logout_take_bearer_or_bare_tokens_and_refuse_revoked_ones() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, Some("ali@example.com"), Some(PHONE))
        .await;
    let token = app.acl_full_login("ali", PASSWORD, PHONE, 1).await;
    let bearer = app.acl_get("me", Some(&format!("Bearer {token}"))).await;
    let bare = app.acl_get("me", Some(&token)).await;
    assert_eq!(bearer.status, 200);
    assert_eq!(bearer.body, bare.body);
    let user = &bearer.body["data"];
    assert_eq!(user["username"], "ali");
    assert_eq!(user["phone"], PHONE);
    assert_eq!(user["totp_enabled"], false);
    assert!(
        !bearer.body.to_string().contains("argon2"),
        "a secret leaked: {}",
        bearer.body
    );
    let missing = app.acl_get("me", None).await;
    assert_eq!(
        (
            missing.status,
            missing.body["meta"]["message_code"].as_str()
        ),
        (401, Some("401-1"))
    );
    assert_eq!(missing.body["data"], serde_json::Value::Null);
    let out = app.acl_authed(Method::POST, "logout", &token, None).await;
    assert_eq!(out.status, 200);
    assert_eq!(out.body["data"], serde_json::Value::Null);
    let revoked = app.acl_get("me", Some(&token)).await;
    assert_eq!(revoked.status, 401);
}

fn totp_now(secret: &str, app: &crate::helpers::TestApp) -> String {
    let bytes = otpgate_core::otp::secret_from_base32(secret).unwrap();
    otpgate_core::otp::TotpParams::default()
        .code_at(&bytes, app.clock_now().unix_timestamp())
        .unwrap()
}

#[tokio::test]
async fn an_authenticator_enrolled_and_confirmed_then_wins_the_login() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let token = app.acl_full_login("ali", PASSWORD, PHONE, 1).await;
    // Enrol: secret, URI with issuer and account, QR as PNG and SVG, ten recovery codes.
    let enrolled = app.acl_authed(Method::POST, "totp", &token, None).await;
    assert_eq!(enrolled.status, 200, "{:?}", enrolled.body);
    let data = &enrolled.body["data"];
    let secret = data["secret"].as_str().unwrap().to_owned();
    assert!(
        data["otpauth_uri"]
            .as_str()
            .unwrap()
            .starts_with("otpauth://totp/otpgate:ali?secret=")
    );
    assert!(
        data["otpauth_uri"]
            .as_str()
            .unwrap()
            .contains("issuer=otpgate")
    );
    assert!(
        data["qr_png"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,iVBORw0KGgo")
    );
    assert!(data["qr_svg"].as_str().unwrap().contains("<svg"));
    assert_eq!(data["recovery_codes"].as_array().unwrap().len(), 10);
    assert_eq!(data["active"], false);
    // Not active before its first code: the next login still goes by SMS.
    assert_eq!(
        app.acl_login("ali", PASSWORD).await.body["data"]["method"],
        "sms"
    );
    let code = totp_now(&secret, &app);
    let confirmed = app
        .acl_authed(
            Method::POST,
            "totp/confirm",
            &token,
            Some(json!({"otp": code})),
        )
        .await;
    assert_eq!(confirmed.status, 200, "{:?}", confirmed.body);
    // The confirming code is spent.
    app.clock.advance(Duration::from_secs(31));
    let step1 = app.acl_login("ali", PASSWORD).await;
    assert_eq!(step1.body["data"]["method"], "totp");
    assert_eq!(step1.body["data"]["resend_at"], serde_json::Value::Null);
    let ticket = step1.body["data"]["token"].as_str().unwrap();
    let messages_before = app.sender.messages().len();
    assert_eq!(
        app.acl_confirm(ticket, &totp_now(&secret, &app))
            .await
            .status,
        200
    );
    assert_eq!(
        app.sender.messages().len(),
        messages_before,
        "a TOTP login sent a message"
    );
    assert_eq!(
        app.acl_authed(Method::POST, "totp", &token, None)
            .await
            .status,
        409
    );
}

#[tokio::test]
async fn a_recovery_code_replaces_the_authenticator_once() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let token = app.acl_full_login("ali", PASSWORD, PHONE, 1).await;
    let enrolled = app.acl_authed(Method::POST, "totp", &token, None).await;
    let secret = enrolled.body["data"]["secret"].as_str().unwrap().to_owned();
    app.acl_authed(
        Method::POST,
        "totp/confirm",
        &token,
        Some(json!({"otp": totp_now(&secret, &app)})),
    )
    .await;
    let renewed = app
        .acl_authed(Method::POST, "recovery_codes", &token, None)
        .await;
    let codes: Vec<String> = renewed.body["data"]["recovery_codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let old = enrolled.body["data"]["recovery_codes"][0].as_str().unwrap();
    let ticket = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app.acl_confirm(&ticket, old).await.status,
        401,
        "a replaced recovery code worked"
    );
    assert_eq!(app.acl_confirm(&ticket, &codes[0]).await.status, 200);
    app.clock.advance(Duration::from_secs(60));
    let again = app.acl_login("ali", PASSWORD).await.body["data"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app.acl_confirm(&again, &codes[0]).await.status,
        401,
        "a recovery code worked twice"
    );
    let me = app.acl_get("me", Some(&token)).await;
    assert_eq!(me.body["data"]["recovery_codes_left"], 9);
}

#[tokio::test]
async fn removing_the_authenticator_needs_a_current_code() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let token = app.acl_full_login("ali", PASSWORD, PHONE, 1).await;
    let secret = app
        .acl_authed(Method::POST, "totp", &token, None)
        .await
        .body["data"]["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    app.acl_authed(
        Method::POST,
        "totp/confirm",
        &token,
        Some(json!({"otp": totp_now(&secret, &app)})),
    )
    .await;
    let stale = app
        .acl_authed(
            Method::DELETE,
            "totp",
            &token,
            Some(json!({"otp": totp_now(&secret, &app)})),
        )
        .await;
    assert_eq!(stale.status, 401, "a spent code removed the authenticator");
    app.clock.advance(Duration::from_secs(30));
    let removed = app
        .acl_authed(
            Method::DELETE,
            "totp",
            &token,
            Some(json!({"otp": totp_now(&secret, &app)})),
        )
        .await;
    assert_eq!(removed.status, 200);
    assert_eq!(
        app.acl_login("ali", PASSWORD).await.body["data"]["method"],
        "sms"
    );
}

#[tokio::test]
async fn external_login_turns_a_valid_token_into_a_panel_session_cookie() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    let token = app.acl_full_login("ali", PASSWORD, PHONE, 1).await;
    let no_redirects = crate::helpers::http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = no_redirects
        .get(app.url(&format!("/external-login?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    let headers = answer.headers();
    assert_eq!(headers["location"], "/");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-store");
    let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.starts_with("otpgate_panel="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(!cookie.contains(&token), "the API token became the cookie");
    let panel_token = cookie
        .trim_start_matches("otpgate_panel=")
        .split(';')
        .next()
        .unwrap();
    let page = app
        .client
        .get(app.url("/"))
        .header("cookie", format!("otpgate_panel={panel_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("ali"));
    // Over TLS (as a proxy reports it) the cookie is Secure.
    let tls = no_redirects
        .get(app.url(&format!("/external-login?token={token}")))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert!(
        tls.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("; Secure")
    );
}

#[tokio::test]
async fn external_login_with_a_bad_token_goes_to_the_login_page_without_reflecting_it() {
    let app = spawn_app().await;
    let no_redirects = crate::helpers::http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = no_redirects
        .get(app.url("/external-login?token=deadbeefdeadbeefdeadbeefdeadbeef%3Cscript%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers()["location"], "/login?error=invalid_token");
    assert!(answer.headers().get("set-cookie").is_none());
    let page = app
        .client
        .get(app.url("/login?error=invalid_token"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains("deadbeef") && page.contains("role=\"alert\""));
    let start = no_redirects.get(app.url("/")).send().await.unwrap();
    assert_eq!(start.headers()["location"], "/login");
}

#[tokio::test]
async fn after_a_hundred_consecutive_failures_only_an_operator_unlocks_the_account() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, None, Some(PHONE)).await;
    // Wrong passwords, waiting out each lock-out, until 100 failures in a row.
    let mut failures = 0;
    while failures < 100 {
        app.clock.advance(Duration::from_secs(16 * 60));
        assert_eq!(app.acl_login("ali", "wrong").await.status, 401);
        failures = app
            .core
            .user_by_username(&app.tenant, "ali")
            .await
            .unwrap()
            .failed_logins;
    }
    // Now even the right password, days later, is refused like any wrong one.
    app.clock.advance(Duration::from_secs(7 * 24 * 3600));
    let refused = app.acl_login("ali", PASSWORD).await;
    assert_eq!((refused.status, &refused.body), (401, &invalid_401()));
    app.core
        .unlock_user(&app.tenant, "ali", &Default::default())
        .await
        .unwrap();
    assert_eq!(app.acl_login("ali", PASSWORD).await.status, 200);
}
