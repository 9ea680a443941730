//! Operators manage users and their authenticators through the native API.

use std::time::Duration;

use serde_json::json;

use crate::helpers::spawn_app;

fn totp_at(secret: &str, unix: i64) -> String {
    let bytes = otpgate_core::otp::secret_from_base32(secret).unwrap();
    otpgate_core::otp::TotpParams::default()
        .code_at(&bytes, unix)
        .unwrap()
}

#[tokio::test]
async fn an_operator_creates_a_user_and_manages_its_authenticator() {
    // Arrange
    let app = spawn_app().await;
    let created = app
        .send(app.post("/v1/users").json(&json!({
            "username": "Mina", "password": "pw-mina-1234", "phone": "+98 912 000 1111", "role": "admin"
        })))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["username"], "mina");
    assert_eq!(created.body["phone"], "+989120001111");
    assert_eq!(created.body["totp_enabled"], false);
    assert!(created.body.get("password_hash").is_none());
    let id = created.body["id"].as_str().unwrap().to_owned();
    let duplicate = app
        .send(
            app.post("/v1/users")
                .json(&json!({"username": "mina", "password": "x-1234567"})),
        )
        .await;
    assert_eq!(
        (duplicate.status, duplicate.body["code"].as_str()),
        (409, Some("conflict"))
    );

    // Act: enrol (pending), confirm with a first code.
    let enrolled = app.send(app.post(&format!("/v1/users/{id}/totp"))).await;
    assert_eq!(enrolled.status, 201, "{:?}", enrolled.body);
    assert_eq!(enrolled.body["active"], false);
    assert!(
        enrolled.body["qr_png"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,")
    );
    assert_eq!(
        enrolled.body["recovery_codes"].as_array().unwrap().len(),
        10
    );
    let secret = enrolled.body["secret"].as_str().unwrap().to_owned();
    let now = app.clock_now().unix_timestamp();
    let confirmed = app
        .send(
            app.post(&format!("/v1/users/{id}/totp/confirm"))
                .json(&json!({"code": totp_at(&secret, now)})),
        )
        .await;
    assert_eq!(confirmed.status, 200, "{:?}", confirmed.body);
    assert_eq!(confirmed.body["totp_enabled"], true);

    // Assert: removal needs a fresh code; then the user has no authenticator.
    let replay = app
        .send(
            app.client
                .delete(app.url(&format!("/v1/users/{id}/totp")))
                .bearer_auth(&app.api_key)
                .json(&json!({"code": totp_at(&secret, now)})),
        )
        .await;
    assert_eq!(replay.status, 400, "{:?}", replay.body);
    app.clock.advance(Duration::from_secs(30));
    let removed = app
        .send(
            app.client
                .delete(app.url(&format!("/v1/users/{id}/totp")))
                .bearer_auth(&app.api_key)
                .json(&json!({"code": totp_at(&secret, now + 30)})),
        )
        .await;
    assert_eq!(removed.status, 200, "{:?}", removed.body);
    assert_eq!(removed.body["totp_enabled"], false);
    assert_eq!(removed.body["recovery_codes_left"], 0);
}

#[tokio::test]
async fn an_operator_enrolment_can_be_active_at_once() {
    let app = spawn_app().await;
    let user = app
        .create_user("reza", "pw-reza-1234", None, Some("+989120002222"))
        .await;
    let enrolled = app
        .send(
            app.post(&format!("/v1/users/{}/totp", user.id))
                .json(&json!({"activate": true})),
        )
        .await;
    assert_eq!(enrolled.body["active"], true);
    let shown = app
        .send(
            app.client
                .get(app.url(&format!("/v1/users/{}", user.id)))
                .bearer_auth(&app.api_key),
        )
        .await;
    assert_eq!(shown.body["totp_enabled"], true);
    assert_eq!(
        app.acl_login("reza", "pw-reza-1234").await.body["data"]["method"],
        "totp"
    );
}

#[tokio::test]
async fn another_tenants_users_are_invisible() {
    let app = spawn_app().await;
    let user = app.create_user("reza", "pw-reza-1234", None, None).await;
    let other = app.core.create_tenant("other").await.unwrap();
    let (_, key) = app.core.create_api_key(&other.id, "other").await.unwrap();
    let key = secrecy::ExposeSecret::expose_secret(&key).to_owned();
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/users/{}", user.id)),
        (reqwest::Method::POST, format!("/v1/users/{}/totp", user.id)),
        (
            reqwest::Method::POST,
            format!("/v1/users/{}/recovery_codes", user.id),
        ),
    ] {
        let answer = app
            .send(app.client.request(method, app.url(&path)).bearer_auth(&key))
            .await;
        assert_eq!(answer.status, 404, "{path}");
    }
    let (active, _) = app.core.totp_status(&app.tenant, &user.id).await.unwrap();
    assert!(!active);
}

#[tokio::test]
async fn weak_passwords_are_refused_naming_the_rule() {
    let app = spawn_app().await;
    for (password, message) in [
        ("short", "password must be at least 8 characters"),
        (
            "Password1",
            "password is one of the most common passwords; choose another",
        ),
    ] {
        let answer = app
            .send(
                app.post("/v1/users")
                    .json(&json!({"username": "weak", "password": password})),
            )
            .await;
        assert_eq!(answer.status, 400, "{password}");
        assert_eq!(answer.body["field"], "password");
        assert_eq!(answer.body["message"], message);
    }
    let long = "a long and unusual passphrase ".repeat(3);
    let created = app
        .send(
            app.post("/v1/users")
                .json(&json!({"username": "strong", "password": long})),
        )
        .await;
    assert_eq!(created.status, 201);
    assert!(
        app.core
            .user_by_username(&app.tenant, "weak")
            .await
            .is_err(),
        "a refused user was stored"
    );
}
