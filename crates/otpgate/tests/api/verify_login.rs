//! The verify_login dialect: a table of steps walks every path of its state machine over HTTP,
//! in JSON and as a form, comparing whole bodies.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{TestApp, spawn_app, wrong_code};

const PHONE: &str = "+989121234567";
const EMAIL: &str = "ali@example.com";
const PASSWORD: &str = "correct horse battery";

#[derive(Clone, Copy)]
enum Encoding {
    Json,
    Form,
}

#[derive(Clone, Copy)]
enum Code {
    None,
    /// The newest code delivered to this destination.
    Right(&'static str),
    Wrong(&'static str),
}

async fn call(
    app: &TestApp,
    encoding: Encoding,
    fields: &[(&str, Value)],
) -> crate::helpers::Answer {
    let url = app.url("/api/verify_login_otp");
    match encoding {
        Encoding::Json => {
            let body: serde_json::Map<String, Value> = fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect();
            app.send(app.client.post(url).json(&body)).await
        }
        Encoding::Form => {
            let pairs: Vec<(String, String)> = fields
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect();
            let body = serde_urlencoded::to_string(&pairs).unwrap();
            app.send(
                app.client
                    .post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body),
            )
            .await
        }
    }
}

fn base(username: &str, verify_type: &str, mode: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("username", json!(username)),
        ("password", json!(PASSWORD)),
        ("latitude", json!(35.6892)),
        ("longitude", json!(51.389)),
        ("req_mode", json!(mode)),
        ("verify_type", json!(verify_type)),
    ]
}

async fn with_code(
    app: &TestApp,
    mut fields: Vec<(&'static str, Value)>,
    code: Code,
) -> Vec<(&'static str, Value)> {
    // The newest code queued for the destination, once delivered (every queued one counts).
    let newest = |to: &'static str| async move {
        let queued = app.sends_to(to).await as usize;
        app.sender.wait_for_code(to, queued).await
    };
    let digits = match code {
        Code::None => return fields,
        Code::Right(to) => newest(to).await,
        Code::Wrong(to) => newest(to).await.map(|c| wrong_code(&c)),
    }
    .expect("a code was sent");
    for (i, name) in ["otp1", "otp2", "otp3", "otp4", "otp5", "otp6"]
        .into_iter()
        .enumerate()
    {
        let digit = digits.chars().nth(i).unwrap().to_digit(10).unwrap();
        // Digits as JSON numbers and as strings are both accepted: alternate them.
        fields.push((
            name,
            if i % 2 == 0 {
                json!(digit)
            } else {
                json!(digit.to_string())
            },
        ));
    }
    fields
}

struct Step {
    verify_type: &'static str,
    code: Code,
    advance: u64,
    expect: Value,
}

fn step(verify_type: &'static str, code: Code, advance: u64, expect: Value) -> Step {
    Step {
        verify_type,
        code,
        advance,
        expect,
    }
}

async fn walk(encoding: Encoding, username: &str, steps: Vec<Step>) -> TestApp {
    let app = spawn_app().await;
    app.create_user(username, PASSWORD, Some(EMAIL), Some(PHONE))
        .await;
    for (i, s) in steps.into_iter().enumerate() {
        app.clock.advance(Duration::from_secs(s.advance));
        let fields = with_code(&app, base(username, s.verify_type, "web"), s.code).await;
        let answer = call(&app, encoding, &fields).await;
        assert_eq!(answer.body, s.expect, "step {i} ({})", s.verify_type);
    }
    app
}

fn body(code: u8, message: &str) -> Value {
    json!({"status_code": code, "message": message})
}

fn mobile_first() -> Vec<Step> {
    vec![
        // Login is refused until the phone is verified: its code is sent.
        step(
            "login_verify",
            Code::None,
            0,
            body(5, "Email Verified, Mobile Verification Required"),
        ),
        step(
            "mobile_verify",
            Code::Wrong(PHONE),
            0,
            body(0, "Invalid otp entered"),
        ),
        // The e-mail is next: its code is sent and the address named.
        step(
            "mobile_verify",
            Code::Right(PHONE),
            0,
            json!({"status_code": 4, "message": "Mobile Verified, Email Verification Required", "email": EMAIL}),
        ),
        // A mobile code is not an e-mail code.
        step(
            "email_verify",
            Code::Right(PHONE),
            0,
            body(0, "Invalid otp entered"),
        ),
        step(
            "email_verify",
            Code::Right(EMAIL),
            0,
            json!({"status_code": 1, "message": "Login Successful", "url": "dashboard"}),
        ),
        // Verified: later logins need a login code (SMS).
        step(
            "login_verify",
            Code::None,
            40,
            body(3, "Login Verification Required"),
        ),
        step(
            "login_verify",
            Code::Wrong(PHONE),
            0,
            body(0, "Invalid otp entered"),
        ),
        step(
            "login_verify",
            Code::Right(PHONE),
            0,
            json!({"status_code": 1, "message": "Login Successful", "url": "dashboard"}),
        ),
    ]
}

#[tokio::test]
async fn every_path_of_the_state_machine_in_json() {
    walk(Encoding::Json, "ali", mobile_first()).await;
}

#[tokio::test]
async fn every_path_of_the_state_machine_as_a_form() {
    walk(Encoding::Form, "ali", mobile_first()).await;
}

#[tokio::test]
async fn email_first_then_mobile() {
    for encoding in [Encoding::Json, Encoding::Form] {
        walk(
            encoding,
            "ali",
            vec![
                step(
                    "email_verify",
                    Code::None,
                    0,
                    body(3, "Login Verification Required"),
                ),
                step(
                    "email_verify",
                    Code::Right(EMAIL),
                    0,
                    body(5, "Email Verified, Mobile Verification Required"),
                ),
                // An e-mail code is not a mobile code, nor a login code.
                step(
                    "mobile_verify",
                    Code::Right(EMAIL),
                    0,
                    body(0, "Invalid otp entered"),
                ),
                step(
                    "login_verify",
                    Code::Right(EMAIL),
                    0,
                    body(5, "Email Verified, Mobile Verification Required"),
                ),
                step(
                    "mobile_verify",
                    Code::Right(PHONE),
                    0,
                    json!({"status_code": 1, "message": "Login Successful", "url": "dashboard"}),
                ),
            ],
        )
        .await;
    }
}

#[tokio::test]
async fn a_mobile_code_is_not_accepted_for_login() {
    let app = walk(
        Encoding::Json,
        "ali",
        vec![
            step("mobile_verify", Code::None, 0, body(3, "Login Verification Required")),
            step("mobile_verify", Code::Right(PHONE), 0, json!({"status_code": 4, "message": "Mobile Verified, Email Verification Required", "email": EMAIL})),
            step("email_verify", Code::Right(EMAIL), 0, json!({"status_code": 1, "message": "Login Successful", "url": "dashboard"})),
            step("mobile_verify", Code::None, 40, body(3, "Login Verification Required")),
            step("login_verify", Code::Right(PHONE), 0, body(0, "Invalid otp entered")),
        ],
    )
    .await;
    assert!(
        app.sender
            .messages()
            .iter()
            .all(|m| m.code.as_deref().is_some_and(|c| c.len() == 6))
    );
}

#[tokio::test]
async fn admins_go_to_the_admin_dashboard_and_apps_get_a_token() {
    let app = spawn_app().await;
    let user = app
        .core
        .create_user(
            &app.tenant,
            otpgate_core::service::NewUser {
                username: "boss".into(),
                password: secrecy::SecretString::from(PASSWORD),
                email: None,
                phone: Some(PHONE.into()),
                role: otpgate_core::model::Role::Admin,
            },
            &Default::default(),
        )
        .await
        .unwrap();
    let first = call(&app, Encoding::Json, &base("boss", "mobile_verify", "app")).await;
    assert_eq!(first.body, body(3, "Login Verification Required"));
    let fields = with_code(
        &app,
        base("boss", "mobile_verify", "app"),
        Code::Right(PHONE),
    )
    .await;
    let answer = call(&app, Encoding::Json, &fields).await;
    assert_eq!(
        crate::helpers::masked(answer.body.clone(), &["/token", "/expires_at"]),
        json!({"status_code": 1, "message": "Login Successful", "url": "admin-dashboard", "token": "<masked>", "expires_at": "<masked>"})
    );
    let token = answer.body["token"].as_str().unwrap();
    assert_eq!(
        app.acl_get("me", Some(token)).await.body["data"]["id"],
        user.id.as_str()
    );
    assert!(
        answer.headers["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("otpgate_panel=")
    );
    // The login is in the user's history with where it came from.
    let history = app
        .send(
            app.client
                .get(app.url(&format!("/v1/users/{}/events", user.id)))
                .bearer_auth(&app.api_key),
        )
        .await;
    let events = history.body["events"].as_array().unwrap();
    let issued = events
        .iter()
        .find(|e| e["kind"] == "token_issued")
        .expect("a token_issued event");
    assert_eq!(issued["latitude"], 35.6892);
    assert_eq!(issued["longitude"], 51.389);
    assert_eq!(issued["mode"], "app");
}

#[tokio::test]
async fn web_logins_set_the_panel_cookie_and_carry_no_token() {
    let app = walk(
        Encoding::Form,
        "ali",
        vec![
            step("mobile_verify", Code::None, 0, body(3, "Login Verification Required")),
            step("mobile_verify", Code::Right(PHONE), 0, json!({"status_code": 4, "message": "Mobile Verified, Email Verification Required", "email": EMAIL})),
        ],
    )
    .await;
    let fields = with_code(&app, base("ali", "email_verify", "web"), Code::Right(EMAIL)).await;
    let answer = call(&app, Encoding::Form, &fields).await;
    assert_eq!(
        answer.body,
        json!({"status_code": 1, "message": "Login Successful", "url": "dashboard"})
    );
    let cookie = answer.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"));
}

#[tokio::test]
async fn wrong_credentials_answer_one_message_whatever_was_wrong() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, Some(EMAIL), Some(PHONE))
        .await;
    let mut wrong_password = base("ali", "login_verify", "web");
    wrong_password[1].1 = json!("nope");
    let unknown = base("nobody", "login_verify", "web");
    for fields in [wrong_password, unknown] {
        let answer = call(&app, Encoding::Json, &fields).await;
        assert_eq!(answer.body, body(0, "Invalid username or password"));
    }
    // The mobile number works as the username too.
    let by_phone = call(&app, Encoding::Json, &base(PHONE, "mobile_verify", "web")).await;
    assert_eq!(by_phone.body, body(3, "Login Verification Required"));
}

#[tokio::test]
async fn the_fifth_wrong_code_kills_the_code() {
    let app = spawn_app().await;
    app.create_user("ali", PASSWORD, Some(EMAIL), Some(PHONE))
        .await;
    call(&app, Encoding::Json, &base("ali", "mobile_verify", "web")).await;
    for _ in 0..5 {
        let fields = with_code(
            &app,
            base("ali", "mobile_verify", "web"),
            Code::Wrong(PHONE),
        )
        .await;
        assert_eq!(
            call(&app, Encoding::Json, &fields).await.body,
            body(0, "Invalid otp entered")
        );
    }
    let fields = with_code(
        &app,
        base("ali", "mobile_verify", "web"),
        Code::Right(PHONE),
    )
    .await;
    assert_eq!(
        call(&app, Encoding::Json, &fields).await.body,
        body(0, "Invalid otp entered")
    );
}

#[tokio::test]
async fn each_validation_message() {
    let app = spawn_app().await;
    let full = base("ali", "login_verify", "web");
    let without = |name: &str| {
        full.iter()
            .filter(|(k, _)| *k != name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let replaced = |name: &str, value: Value| {
        full.iter()
            .map(|(k, v)| {
                if *k == name {
                    (*k, value.clone())
                } else {
                    (*k, v.clone())
                }
            })
            .collect::<Vec<_>>()
    };
    let mut cases: Vec<(Vec<(&str, Value)>, &str)> = vec![];
    for name in [
        "username",
        "password",
        "latitude",
        "longitude",
        "req_mode",
        "verify_type",
    ] {
        cases.push((without(name), ""));
    }
    let expected_missing = [
        "username is required",
        "password is required",
        "latitude is required",
        "longitude is required",
        "req_mode is required",
        "verify_type is required",
    ];
    for (case, message) in cases.iter_mut().zip(expected_missing) {
        case.1 = message;
    }
    cases.push((
        replaced("latitude", json!(91)),
        "latitude must be between -90 and 90",
    ));
    cases.push((
        replaced("latitude", json!("north")),
        "latitude must be a number",
    ));
    cases.push((
        replaced("longitude", json!(-180.5)),
        "longitude must be between -180 and 180",
    ));
    cases.push((
        replaced("req_mode", json!("tv")),
        "req_mode must be web or app",
    ));
    cases.push((
        replaced("verify_type", json!("face")),
        "verify_type must be mobile_verify, email_verify or login_verify",
    ));
    let mut partial = full.clone();
    partial.push(("otp1", json!(1)));
    cases.push((partial.clone(), "otp2 is required"));
    let mut not_digit = full.clone();
    for (i, name) in ["otp1", "otp2", "otp3", "otp4", "otp5", "otp6"]
        .into_iter()
        .enumerate()
    {
        not_digit.push((name, if i == 3 { json!(12) } else { json!(1) }));
    }
    cases.push((not_digit, "otp4 must be a single digit"));
    for (fields, message) in cases {
        for encoding in [Encoding::Json, Encoding::Form] {
            let answer = call(&app, encoding, &fields).await;
            assert_eq!(answer.body, body(2, message), "{fields:?}");
        }
    }
    assert!(app.sender.messages().is_empty());
}
