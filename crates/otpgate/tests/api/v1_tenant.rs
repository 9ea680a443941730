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
        (json!({"max_sends_per_window": 0}), 400),
        (json!({"max_sends_per_day": 0}), 400),
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

pub async fn set(app: &crate::helpers::TestApp, settings: serde_json::Value) {
    let answer = app
        .send(
            app.client
                .put(app.url("/v1/tenant/settings"))
                .bearer_auth(&app.api_key)
                .json(&settings),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

#[tokio::test]
async fn sends_are_limited_per_ip_and_nothing_is_queued_over_the_limit() {
    let app = spawn_app().await;
    set(&app, json!({"max_sends_per_ip_per_hour": 3})).await;
    for i in 0..3 {
        assert_eq!(app.start_sms(&format!("+98912000000{i}")).await.status, 201);
    }
    let refused = app.start_sms("+989120000009").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["retry_after"], 3600);
    assert_eq!(refused.headers["retry-after"], "3600");
    assert_eq!(app.sends_to("+989120000009").await, 0);
}

#[tokio::test]
async fn a_per_ip_limit_of_zero_is_off() {
    // The default allows 30 sends an hour from one address: a backend that sends every code
    // of its product from one address turns the limit off instead.
    let app = spawn_app().await;
    set(&app, json!({"max_sends_per_ip_per_hour": 0})).await;
    for i in 0..35 {
        let answer = app.start_sms(&format!("+9891200001{i:02}")).await;
        assert_eq!(answer.status, 201, "send {i}: {:?}", answer.body);
    }
    set(&app, json!({"max_sends_per_ip_per_hour": 35})).await;
    assert_eq!(app.start_sms("+989120000199").await.status, 429);
}

#[tokio::test]
async fn a_country_prefix_has_its_own_hourly_budget() {
    let app = spawn_app().await;
    set(&app, json!({"max_sends_per_country_per_hour": 2})).await;
    assert_eq!(app.start_sms("+989120000001").await.status, 201);
    assert_eq!(app.start_sms("+989120000002").await.status, 201);
    assert_eq!(
        app.start_sms("+989120000003").await.status,
        429,
        "a third +98 number"
    );
    assert_eq!(
        app.start_sms("+447911123456").await.status,
        201,
        "+44 has a budget of its own"
    );
    app.clock.advance(std::time::Duration::from_secs(3601));
    assert_eq!(
        app.start_sms("+989120000003").await.status,
        201,
        "the budget renews each hour"
    );
}

#[tokio::test]
async fn a_destination_has_a_daily_limit_beyond_the_ten_minute_one() {
    let app = spawn_app().await;
    set(&app, json!({"max_sends_per_day": 3})).await;
    for _ in 0..3 {
        assert_eq!(app.start_sms("+989120000001").await.status, 201);
        app.clock.advance(std::time::Duration::from_secs(11 * 60));
    }
    let refused = app.start_sms("+989120000001").await;
    assert_eq!(
        (refused.status, refused.body["retry_after"].as_u64()),
        (429, Some(86_400))
    );
}

#[tokio::test]
async fn an_account_has_an_hourly_limit_and_a_new_code_keeps_its_failures() {
    let app = spawn_app().await;
    set(&app, json!({"max_sends_per_account_per_hour": 2})).await;
    app.create_user("ali", "pw-ali-12345", None, Some("+989121234567"))
        .await;
    let first = app.acl_login("ali", "pw-ali-12345").await;
    let right = app.delivered_code("+989121234567", 1).await;
    let wrong = crate::helpers::wrong_code(&right);
    let ticket = first.body["data"]["token"].as_str().unwrap().to_owned();
    assert_eq!(app.acl_confirm(&ticket, &wrong).await.status, 401);
    app.clock.advance(std::time::Duration::from_secs(31));
    assert_eq!(
        app.acl("resend_otp", json!({"token": ticket})).await.status,
        200
    );
    // Asking for a new code did not reset the account's failure count.
    assert_eq!(
        app.core
            .user_by_username(&app.tenant, "ali")
            .await
            .unwrap()
            .failed_logins,
        1
    );
    app.clock.advance(std::time::Duration::from_secs(31));
    let third = app.acl("resend_otp", json!({"token": ticket})).await;
    assert_eq!(
        (third.status, third.body["meta"]["message_code"].as_str()),
        (429, Some("429-1"))
    );
}

#[tokio::test]
async fn sms_goes_only_to_allowed_country_codes() {
    let app = spawn_app().await;
    set(&app, json!({"allowed_country_codes": ["+98"]})).await;
    assert_eq!(app.start_sms("+989120000001").await.status, 201);
    let refused = app.start_sms("+447911123456").await;
    assert_eq!(
        (refused.status, refused.body["code"].as_str()),
        (400, Some("invalid_input"))
    );
    assert_eq!(app.sends_to("+447911123456").await, 0);
    // E-mail is not concerned.
    let email = app
        .start_verification(json!({"to": "ali@example.com", "channel": "email"}))
        .await;
    assert_eq!(email.status, 201);
    let invalid = app
        .send(
            app.client
                .put(app.url("/v1/tenant/settings"))
                .bearer_auth(&app.api_key)
                .json(&json!({"allowed_country_codes": ["98"]})),
        )
        .await;
    assert_eq!(invalid.status, 400);
}

#[tokio::test]
async fn a_key_in_use_is_refused_right_after_its_revocation() {
    // Arrange: a second key of the tenant, just used (so it is trusted for a moment).
    let app = spawn_app().await;
    let (key, secret) = app.core.create_api_key(&app.tenant, "temp").await.unwrap();
    let secret = secrecy::ExposeSecret::expose_secret(&secret).to_owned();
    let settings = |bearer: &str| {
        app.client
            .get(app.url("/v1/tenant/settings"))
            .bearer_auth(bearer.to_owned())
    };
    assert_eq!(app.send(settings(&secret)).await.status, 200);
    // Act
    let revoked = app
        .send(
            app.client
                .delete(app.url(&format!("/v1/api_keys/{}", key.id)))
                .bearer_auth(&app.api_key),
        )
        .await;
    // Assert: refused on the very next request, the other key still works.
    assert_eq!(revoked.status, 204);
    assert_eq!(app.send(settings(&secret)).await.status, 401);
    assert_eq!(app.send(settings(&app.api_key)).await.status, 200);
}
