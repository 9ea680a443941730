//! Bad input, one test per class: each answers a 4xx with a stable `code` and changes nothing.

use serde_json::json;

use crate::helpers::spawn_app;

const PHONE: &str = "+989121234567";

#[tokio::test]
async fn malformed_json_is_a_400() {
    let app = spawn_app().await;
    let answer = app
        .send(
            app.post("/v1/verifications")
                .header("content-type", "application/json")
                .body("{\"to\": \"+98912"),
        )
        .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["code"], "malformed_json");
    assert_eq!(app.sends_to(PHONE).await, 0);
}

#[tokio::test]
async fn a_wrong_content_type_is_a_415() {
    let app = spawn_app().await;
    let answer = app
        .send(
            app.post("/v1/verifications")
                .header("content-type", "text/plain")
                .body(json!({"to": PHONE, "channel": "sms"}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 415);
    assert_eq!(answer.body["code"], "unsupported_media_type");
    assert_eq!(app.sends_to(PHONE).await, 0);
}

#[tokio::test]
async fn a_body_over_64_kib_is_a_413() {
    let app = spawn_app().await;
    let padding = "x".repeat(65 * 1024);
    let answer = app
        .send(
            app.post("/v1/verifications")
                .header("content-type", "application/json")
                .body(json!({"to": PHONE, "channel": "sms", "locale": padding}).to_string()),
        )
        .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.body["code"], "body_too_large");
    assert_eq!(app.sends_to(PHONE).await, 0);
}

#[tokio::test]
async fn missing_fields_and_wrong_types_are_422_naming_the_field() {
    let app = spawn_app().await;
    let missing = app.start_verification(json!({"channel": "sms"})).await;
    assert_eq!(missing.status, 422);
    assert_eq!(missing.body["code"], "invalid_field");
    assert_eq!(missing.body["message"], "to is required");
    let wrong_type = app
        .start_verification(json!({"to": 989121234567u64, "channel": "sms"}))
        .await;
    assert_eq!(wrong_type.status, 422);
    assert_eq!(wrong_type.body["message"], "to has the wrong type or value");
    assert!(
        !wrong_type.body.to_string().contains("989121234567"),
        "the value was echoed"
    );
    let unknown = app
        .start_verification(json!({"to": PHONE, "channel": "sms", "extra": 1}))
        .await;
    assert_eq!(unknown.status, 422);
    let bad_channel = app
        .start_verification(json!({"to": PHONE, "channel": "pigeon"}))
        .await;
    assert_eq!(bad_channel.status, 400);
    assert_eq!(bad_channel.body["field"], "channel");
    assert_eq!(app.sends_to(PHONE).await, 0);
}

#[tokio::test]
async fn invalid_phone_numbers_and_email_addresses_are_refused() {
    let app = spawn_app().await;
    for (to, channel) in [
        ("09121234567", "sms"),
        ("+98 912 abc 4567", "sms"),
        ("+1", "sms"),
        ("ali@", "email"),
        ("not an address", "email"),
        (PHONE, "email"),
    ] {
        let answer = app
            .start_verification(json!({"to": to, "channel": channel}))
            .await;
        assert_eq!(answer.status, 400, "{to} by {channel}: {:?}", answer.body);
        assert_eq!(answer.body["code"], "invalid_input");
        assert_eq!(answer.body["field"], "to");
    }
    assert!(app.sender.messages().is_empty());
}

#[tokio::test]
async fn codes_with_letters_or_the_wrong_length_touch_no_attempt() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for bad in ["12a456", "12345", "1234567", "", "12-3456"] {
        let answer = app.check(&id, bad).await;
        assert_eq!(answer.status, 400, "{bad:?}");
        assert_eq!(answer.body["code"], "invalid_input");
        assert_eq!(answer.body["field"], "code");
    }
    let numeric = app
        .send(
            app.post(&format!("/v1/verifications/{id}/check"))
                .json(&json!({"code": 123456})),
        )
        .await;
    assert_eq!(numeric.status, 422);
    assert_eq!(app.get_verification(&id).await.body["attempts_left"], 5);
}

#[tokio::test]
async fn unknown_and_foreign_verification_ids_are_404() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another tenant's key sees nothing of this tenant's verification.
    let other = app.core.create_tenant("other").await.unwrap();
    let (_, other_key) = app.core.create_api_key(&other.id, "other").await.unwrap();
    let foreign = app
        .send(
            app.client
                .post(app.url(&format!("/v1/verifications/{id}/check")))
                .bearer_auth(secrecy::ExposeSecret::expose_secret(&other_key))
                .json(&json!({"code": "123456"})),
        )
        .await;
    assert_eq!(foreign.status, 404);
    assert_eq!(foreign.body["code"], "not_found");
    for unknown in ["00000000000000000000000000000000", "nope", "../../etc"] {
        let answer = app.check(unknown, "123456").await;
        assert_eq!(answer.status, 404, "{unknown}");
    }
    assert_eq!(app.get_verification(&id).await.body["attempts_left"], 5);
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_is_a_401() {
    let app = spawn_app().await;
    let body = json!({"to": PHONE, "channel": "sms"});
    let missing = app
        .send(app.client.post(app.url("/v1/verifications")).json(&body))
        .await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.body["code"], "unauthorized");
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    let wrong = app
        .send(
            app.client
                .post(app.url("/v1/verifications"))
                .bearer_auth("ogk_0000000000000000000000000000000000000000000000000000000000000000")
                .json(&body),
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(app.sends_to(PHONE).await, 0);
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let app = spawn_app().await;
    let path = app.send(app.client.get(app.url("/v1/nothing"))).await;
    assert_eq!(path.status, 404);
    assert_eq!(path.body["code"], "not_found");
    let method = app
        .send(app.client.delete(app.url("/v1/verifications")))
        .await;
    assert_eq!(method.status, 405);
    assert_eq!(method.body["code"], "method_not_allowed");
}
