//! A tenant's own rules, set through the native API, apply to its codes only.

use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn a_tenants_own_code_length_and_product_name_apply_to_its_codes_only() {
    // Arrange
    let app = spawn_app().await;
    let set = app
        .send(
            app.client
                .put(app.url("/v1/tenant/settings"))
                .bearer_auth(&app.api_key)
                .json(
                    &json!({"code_length": 8, "product_name": "Acme", "resend_cooldown_secs": 60}),
                ),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.body["effective"]["code_length"], 8);
    assert_eq!(
        set.body["effective"]["session_ttl_secs"], 36_000,
        "an unset rule changed"
    );
    // Act
    let started = app.start_sms("+989121234567").await;
    let code = app.delivered_code("+989121234567", 1).await;
    // Assert
    assert_eq!(code.len(), 8);
    let text = app.sender.messages().pop().unwrap().body.unwrap();
    assert!(text.contains("Acme"), "{text}");
    // The resend cool-down is the tenant's own too.
    let again = app.start_sms("+989121234567").await;
    assert_eq!(again.body["retry_after"], 60);
    let id = started.body["id"].as_str().unwrap();
    assert_eq!(
        app.check(id, &code[..6]).await.status,
        400,
        "a 6-digit code was taken"
    );
    assert_eq!(app.check(id, &code).await.body["status"], "approved");
    // Another tenant keeps the defaults.
    let other = app.core.create_tenant("other").await.unwrap();
    let (_, key) = app.core.create_api_key(&other.id, "o").await.unwrap();
    let key = secrecy::ExposeSecret::expose_secret(&key).to_owned();
    let shown = app
        .send(
            app.client
                .get(app.url("/v1/tenant/settings"))
                .bearer_auth(&key),
        )
        .await;
    assert_eq!(shown.body["overrides"], json!({}));
    assert_eq!(shown.body["effective"]["code_length"], 6);
}

#[tokio::test]
async fn invalid_settings_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    for (body, status) in [
        (json!({"code_length": 3}), 400),
        (json!({"max_checks": 0}), 400),
        (json!({"colour": "red"}), 422),
        (json!({"code_length": "eight"}), 422),
    ] {
        let answer = app
            .send(
                app.client
                    .put(app.url("/v1/tenant/settings"))
                    .bearer_auth(&app.api_key)
                    .json(&body),
            )
            .await;
        assert_eq!(answer.status, status, "{body}: {:?}", answer.body);
    }
    let shown = app
        .send(
            app.client
                .get(app.url("/v1/tenant/settings"))
                .bearer_auth(&app.api_key),
        )
        .await;
    assert_eq!(shown.body["overrides"], json!({}));
}
