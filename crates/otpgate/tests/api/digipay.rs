//! The digipay dialect: whole bodies for success and each error, tenant isolation, JWTs checked
//! with the `jsonwebtoken` crate, key rotation, device binding and revocation.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use otpgate_core::crypto::MasterKey;
use otpgate_core::model::TenantId;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::helpers::{Answer, TestApp, masked, spawn_app, wrong_code};

const PHONE: &str = "+919876543210";

fn request(overrides: Value) -> Value {
    let mut body = json!({
        "dial_code": "+91",
        "phone_number": "98765-43210",
        "user_type": 2,
        "otp_type": 1,
        "device_type": 2,
        "device_id": "a1b2c3",
        "device_unique_id": "1234"
    });
    if let (Some(target), Some(extra)) = (body.as_object_mut(), overrides.as_object()) {
        for (k, v) in extra {
            if v.is_null() {
                target.remove(k);
            } else {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    body
}

async fn call(app: &TestApp, path: &str, company: &str, key: &str, body: &Value) -> Answer {
    app.send(
        app.client
            .post(app.url(&format!("/digipay/v3/auth/{path}")))
            .header("authorization", format!("Token {key}"))
            .header("companyid", company)
            .json(body),
    )
    .await
}

async fn send(app: &TestApp, body: &Value) -> Answer {
    call(app, "send_otp", app.tenant.as_str(), &app.api_key, body).await
}

async fn verify(app: &TestApp, body: &Value) -> Answer {
    call(app, "verify_otp", app.tenant.as_str(), &app.api_key, body).await
}

/// Sends a code and verifies it; the verify answer.
async fn sign_in(app: &TestApp, overrides: Value, to: &str) -> Answer {
    let sent = send(app, &request(overrides.clone())).await;
    assert_eq!(sent.status, 200, "{:?}", sent.body);
    let queued = app.sends_to(to).await as usize;
    let code = app.delivered_code(to, queued).await;
    let mut body = request(overrides);
    body["otp"] = json!(code);
    verify(app, &body).await
}

fn bad(codes: &[u16], fields: &[&str]) -> Value {
    let mut data = json!({"message": "BAD_REQUEST"});
    if !fields.is_empty() {
        data["fields"] = json!(fields);
    }
    json!({"success": 0, "error": codes, "data": data})
}

/// The tenant's verifying key secrets, opened with the master key the app generated.
async fn tenant_secrets(app: &TestApp, tenant: &TenantId) -> Vec<(String, Vec<u8>)> {
    let hex = std::fs::read_to_string(app.data_dir.path().join("master.key")).unwrap();
    let master = MasterKey::from_hex(&hex).unwrap();
    app.core
        .store()
        .verifying_jwt_keys(tenant, app.clock_now())
        .await
        .unwrap()
        .into_iter()
        .map(|k| {
            (
                k.id.to_string(),
                master
                    .open(&k.secret_sealed, k.id.as_str().as_bytes())
                    .unwrap(),
            )
        })
        .collect()
}

fn claims_of(token: &str, secret: &[u8]) -> Value {
    let mut validation = Validation::new(Algorithm::HS512);
    // The test clock is not the wall clock: expiry is checked against iat below.
    validation.validate_exp = false;
    decode::<Value>(token, &DecodingKey::from_secret(secret), &validation)
        .expect("a valid HS512 signature")
        .claims
}

#[tokio::test]
async fn verify_otp_answers_the_documented_body_with_a_tenant_signed_jwt() {
    // Arrange
    let app = spawn_app().await;
    let sent = send(&app, &request(json!({}))).await;
    assert_eq!(
        sent.body,
        json!({"success": 1, "error": [], "data": {"message": "OTP sent successfully.", "otp_type": 1, "expires_in": 300, "resend_after": 30}})
    );
    let code = app.delivered_code(PHONE, 1).await;
    // Act
    let mut body = request(json!({}));
    body["otp"] = json!(code);
    let answer = verify(&app, &body).await;
    // Assert: the document's body (token and id masked)
    assert_eq!(answer.status, 200);
    assert_eq!(
        masked(answer.body.clone(), &["/data/token/token", "/data/user_id"]),
        json!({
            "success": 1,
            "error": [],
            "data": {
                "message": "Phone number successfully verified.",
                "token": {"type": "Token", "token": "<masked>"},
                "user_id": "<masked>"
            }
        })
    );
    let user_id = answer.body["data"]["user_id"].as_str().unwrap();
    assert!(user_id.len() == 32 && user_id.bytes().all(|b| b.is_ascii_hexdigit()));
    // The JWT, checked with jsonwebtoken against the tenant's own key.
    let token = answer.body["data"]["token"]["token"].as_str().unwrap();
    let header = decode_header(token).unwrap();
    assert_eq!(header.alg, Algorithm::HS512);
    let secrets = tenant_secrets(&app, &app.tenant).await;
    let (kid, secret) = secrets.first().unwrap();
    assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
    let claims = claims_of(token, secret);
    assert_eq!(claims["sub"], user_id);
    assert_eq!(claims["tid"], app.tenant.as_str());
    assert_eq!(claims["did"], "1234");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        36_000
    );
    assert_eq!(
        claims["iat"].as_i64().unwrap(),
        app.clock_now().unix_timestamp()
    );
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    // The user exists, phone verified, with its type; the device is recorded.
    let user = app.core.user(&app.tenant, user_id).await.unwrap();
    assert_eq!(user.phone.unwrap().as_str(), PHONE);
    assert_eq!(user.user_type, Some(2));
    assert!(user.mobile_verified_at.is_some());
    // The account's trail names the code accepted and this very token.
    let events = app
        .core
        .user_events(&app.tenant, &user.id, 10)
        .await
        .unwrap();
    let issued = format!("jwt {}", claims["jti"].as_str().unwrap());
    assert!(
        events
            .iter()
            .any(|e| e.kind.as_str() == "token_issued" && e.detail == issued),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.kind.as_str() == "otp_accepted"));
}

#[tokio::test]
async fn the_same_phone_and_type_is_the_same_user_and_each_token_is_unique() {
    let app = spawn_app().await;
    let first = sign_in(&app, json!({}), PHONE).await;
    app.clock.advance(Duration::from_secs(31));
    let second = sign_in(
        &app,
        json!({"phone_number": "09876543210", "device_type": "android"}),
        PHONE,
    )
    .await;
    assert_eq!(
        first.body["data"]["user_id"],
        second.body["data"]["user_id"]
    );
    assert_ne!(
        first.body["data"]["token"]["token"],
        second.body["data"]["token"]["token"]
    );
    app.clock.advance(Duration::from_secs(31));
    let employee = sign_in(&app, json!({"user_type": 1}), PHONE).await;
    assert_ne!(
        employee.body["data"]["user_id"],
        first.body["data"]["user_id"]
    );
}

#[tokio::test]
async fn an_email_code_verifies_the_address() {
    let app = spawn_app().await;
    let answer = sign_in(
        &app,
        json!({"otp_type": 2, "email": "Ravi@Example.com"}),
        "Ravi@example.com",
    )
    .await;
    assert_eq!(
        answer.body["data"]["message"],
        "Email successfully verified."
    );
    let user = app
        .core
        .user(
            &app.tenant,
            answer.body["data"]["user_id"].as_str().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(user.email.unwrap().as_str(), "Ravi@example.com");
    assert!(user.email_verified_at.is_some() && user.mobile_verified_at.is_none());
}

#[tokio::test]
async fn each_error_answers_its_documented_code() {
    let app = spawn_app().await;
    // 1001: missing fields, all named.
    let missing = send(
        &app,
        &request(json!({"dial_code": null, "device_unique_id": ""})),
    )
    .await;
    assert_eq!(
        (missing.status, missing.body.clone()),
        (400, bad(&[1001], &["dial_code", "device_unique_id"]))
    );
    // 1002: wrong types and values.
    let wrong = send(
        &app,
        &request(json!({"user_type": "customer", "otp_type": 3, "device_type": "fridge"})),
    )
    .await;
    assert_eq!(
        wrong.body,
        bad(&[1002], &["user_type", "otp_type", "device_type"])
    );
    let long = send(&app, &request(json!({"device_id": "x".repeat(200)}))).await;
    assert_eq!(long.body, bad(&[1002], &["device_id"]));
    // 1003: invalid phone numbers.
    for (dial, number) in [("+91", "555-12ab"), ("+9999", "9876543210"), ("+91", "12")] {
        let answer = send(
            &app,
            &request(json!({"dial_code": dial, "phone_number": number})),
        )
        .await;
        assert_eq!(answer.status, 400, "{dial} {number}");
        assert_eq!(
            answer.body["error"],
            json!([1003]),
            "{dial} {number}: {}",
            answer.body
        );
    }
    // 1008: an e-mail code without a valid address.
    let email = send(
        &app,
        &request(json!({"otp_type": 2, "email": "not-an-address"})),
    )
    .await;
    assert_eq!(email.body["error"], json!([1008]));
    // 1009: not a JSON object.
    let malformed = app
        .send(
            app.client
                .post(app.url("/digipay/v3/auth/send_otp"))
                .header("authorization", format!("Token {}", app.api_key))
                .header("companyid", app.tenant.as_str())
                .header("content-type", "application/json")
                .body("[1,"),
        )
        .await;
    assert_eq!(
        (malformed.status, malformed.body.clone()),
        (400, bad(&[1009], &[]))
    );
    // 1005: no code was sent yet.
    let mut body = request(json!({}));
    body["otp"] = json!("123456");
    assert_eq!(verify(&app, &body).await.body, bad(&[1005], &[]));
    // 1007: a second send within the cool-down.
    assert_eq!(send(&app, &request(json!({}))).await.status, 200);
    let early = send(&app, &request(json!({}))).await;
    assert_eq!(early.status, 429);
    assert_eq!(
        early.body,
        json!({"success": 0, "error": [1007], "data": {"message": "TOO_MANY_REQUESTS", "retry_after": 30}})
    );
    assert_eq!(early.headers["retry-after"], "30");
    // 1004 four times, then 1006 for good.
    let right = app.delivered_code(PHONE, 1).await;
    body["otp"] = json!(wrong_code(&right));
    for _ in 0..4 {
        assert_eq!(verify(&app, &body).await.body, bad(&[1004], &[]));
    }
    assert_eq!(
        verify(&app, &body).await.body,
        bad(&[1006], &[]),
        "the fifth wrong code"
    );
    body["otp"] = json!(right);
    assert_eq!(
        verify(&app, &body).await.body,
        bad(&[1006], &[]),
        "a right code after the limit"
    );
    // 1002 for a code as a JSON number (its leading zeros would be lost).
    body["otp"] = json!(123456);
    assert_eq!(verify(&app, &body).await.body, bad(&[1002], &["otp"]));
    // 1005 once a code expired.
    app.clock.advance(Duration::from_secs(301));
    assert_eq!(
        send(&app, &request(json!({"phone_number": "9876500000"})))
            .await
            .status,
        200
    );
    app.clock.advance(Duration::from_secs(301));
    let code = app.delivered_code("+919876500000", 1).await;
    let mut late = request(json!({"phone_number": "9876500000"}));
    late["otp"] = json!(code);
    assert_eq!(verify(&app, &late).await.body, bad(&[1005], &[]));
}

#[tokio::test]
async fn missing_or_wrong_clients_and_unknown_companies_are_refused() {
    let app = spawn_app().await;
    let body = request(json!({}));
    let unauthorized = json!({"success": 0, "error": [], "data": {"message": "UNAUTHORIZED"}});
    let none = app
        .send(
            app.client
                .post(app.url("/digipay/v3/auth/send_otp"))
                .header("companyid", app.tenant.as_str())
                .json(&body),
        )
        .await;
    assert_eq!(
        (none.status, none.body.clone()),
        (401, unauthorized.clone())
    );
    let wrong = call(&app, "send_otp", app.tenant.as_str(), "ogk_nope", &body).await;
    assert_eq!(
        (wrong.status, wrong.body.clone()),
        (401, unauthorized.clone())
    );
    let unknown = call(
        &app,
        "send_otp",
        "76bc712200ca444fa334f9e55e5fd7a8",
        &app.api_key,
        &body,
    )
    .await;
    assert_eq!(
        (unknown.status, unknown.body.clone()),
        (
            404,
            json!({"success": 0, "error": [], "data": {"message": "NOT_FOUND"}})
        )
    );
    // A client of the default tenant under another existing company: 401.
    let other = app.core.create_tenant("other").await.unwrap();
    let foreign = call(&app, "send_otp", other.id.as_str(), &app.api_key, &body).await;
    assert_eq!(
        (foreign.status, foreign.body.clone()),
        (401, unauthorized.clone())
    );
    // A revoked client is refused.
    let (key, secret) = app.core.create_api_key(&app.tenant, "temp").await.unwrap();
    let revoked = app
        .send(
            app.client
                .delete(app.url(&format!("/v1/api_keys/{}", key.id)))
                .bearer_auth(&app.api_key),
        )
        .await;
    assert_eq!(revoked.status, 204);
    let after = call(
        &app,
        "send_otp",
        app.tenant.as_str(),
        secret.expose_secret(),
        &body,
    )
    .await;
    assert_eq!(after.status, 401);
    assert!(
        app.sender.messages().is_empty(),
        "a refused request sent a code"
    );
}

async fn me(app: &TestApp, token: &str, company: &str, device: &str) -> Answer {
    app.send(
        app.client
            .get(app.url("/v1/me"))
            .header("authorization", format!("Token {token}"))
            .header("companyid", company)
            .header("x-device-unique-id", device),
    )
    .await
}

#[tokio::test]
async fn tokens_are_bound_to_their_tenant_and_device_and_revocable() {
    let app = spawn_app().await;
    let answer = sign_in(&app, json!({}), PHONE).await;
    let token = answer.body["data"]["token"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let user_id = answer.body["data"]["user_id"].as_str().unwrap().to_owned();
    let tenant = app.tenant.as_str().to_owned();
    let ok = me(&app, &token, &tenant, "1234").await;
    assert_eq!(
        (ok.status, ok.body["id"].as_str()),
        (200, Some(user_id.as_str()))
    );
    assert_eq!(
        me(&app, &token, &tenant, "5678").await.status,
        401,
        "another device used the token"
    );
    // Under another tenant: refused, even when that tenant signs tokens of its own.
    let other = app.core.create_tenant("other").await.unwrap();
    app.core
        .rotate_jwt_key(&other.id, &Default::default())
        .await
        .unwrap();
    assert_eq!(
        me(&app, &token, other.id.as_str(), "1234").await.status,
        401
    );
    // A tampered token is refused.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(me(&app, &forged, &tenant, "1234").await.status, 401);
    // Revoked by jti.
    let secrets = tenant_secrets(&app, &app.tenant).await;
    let jti = claims_of(&token, &secrets[0].1)["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = app
        .send(app.post("/v1/tokens/revoke").json(&json!({"jti": jti})))
        .await;
    assert_eq!(revoked.status, 204);
    assert_eq!(me(&app, &token, &tenant, "1234").await.status, 401);
    // Expired after ten hours.
    app.clock.advance(Duration::from_secs(31));
    let fresh = sign_in(&app, json!({}), PHONE).await;
    let fresh = fresh.body["data"]["token"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    app.clock.advance(Duration::from_secs(36_000));
    assert_eq!(me(&app, &fresh, &tenant, "1234").await.status, 401);
}

#[tokio::test]
async fn a_rotated_key_signs_new_tokens_and_the_old_one_still_verifies_its_own() {
    let app = spawn_app().await;
    let before = sign_in(&app, json!({}), PHONE).await;
    let old_token = before.body["data"]["token"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_kid = decode_header(&old_token).unwrap().kid.unwrap();
    let rotated = app.send(app.post("/v1/jwt_keys/rotate")).await;
    assert_eq!(rotated.status, 200);
    let new_kid = rotated.body["key_id"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    app.clock.advance(Duration::from_secs(31));
    let after = sign_in(&app, json!({}), PHONE).await;
    let new_token = after.body["data"]["token"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        decode_header(&new_token).unwrap().kid.as_deref(),
        Some(new_kid.as_str())
    );
    // Both verify, each with its own key (checked with jsonwebtoken).
    let secrets = tenant_secrets(&app, &app.tenant).await;
    let secret = |kid: &str| {
        secrets
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    claims_of(&old_token, &secret(&old_kid));
    claims_of(&new_token, &secret(&new_kid));
    let tenant = app.tenant.as_str().to_owned();
    assert_eq!(me(&app, &old_token, &tenant, "1234").await.status, 200);
    assert_eq!(me(&app, &new_token, &tenant, "1234").await.status, 200);
}
