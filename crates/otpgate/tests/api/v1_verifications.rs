//! The native verification flow: send, check, resend, cancel, expiry, single use.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{spawn_app, wrong_code};

const PHONE: &str = "+989121234567";

#[tokio::test]
async fn a_sent_code_approves_its_verification_once() {
    // Arrange
    let app = spawn_app().await;
    let started = app.start_sms("+98 912 123 4567").await;
    assert_eq!(started.status, 201, "{:?}", started.body);
    assert_eq!(started.body["status"], "pending");
    assert_eq!(started.body["to"], PHONE);
    assert_eq!(started.body["attempts_left"], 5);
    let id = started.body["id"].as_str().unwrap().to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    // Act
    let checked = app.check(&id, &code).await;
    let again = app.check(&id, &code).await;
    // Assert
    assert_eq!(checked.status, 200);
    assert_eq!(
        checked.body,
        json!({"id": id, "status": "approved", "attempts_left": 0})
    );
    assert_eq!(again.status, 409);
    assert_eq!(again.body["code"], "conflict");
    let shown = app.get_verification(&id).await;
    assert_eq!(shown.body["status"], "approved");
    assert_eq!(shown.body["delivery"]["status"], "sent");
}

#[tokio::test]
async fn persian_digits_and_spaces_in_the_code_are_accepted() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    let persian: String = code
        .chars()
        .map(|c| char::from_u32(0x06F0 + c.to_digit(10).unwrap()).unwrap())
        .collect();
    let checked = app.check(&id, &format!("  {persian} ")).await;
    assert_eq!(checked.body["status"], "approved");
}

#[tokio::test]
async fn wrong_codes_count_down_and_the_fifth_kills_the_verification() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let right = app.delivered_code(PHONE, 1).await;
    let wrong = wrong_code(&right);
    for left in (1..5).rev() {
        let checked = app.check(&id, &wrong).await;
        assert_eq!(checked.status, 200);
        assert_eq!(
            checked.body,
            json!({"id": id, "status": "pending", "attempts_left": left})
        );
    }
    let fifth = app.check(&id, &wrong).await;
    assert_eq!(fifth.body["status"], "max_attempts_reached");
    let right_after = app.check(&id, &right).await;
    assert_eq!(right_after.body["status"], "max_attempts_reached");
}

#[tokio::test]
async fn fifty_concurrent_checks_with_the_right_code_approve_exactly_once() {
    // Arrange
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    // Act
    let answers = futures_util::future::join_all((0..50).map(|_| app.check(&id, &code))).await;
    // Assert
    let approved = answers
        .iter()
        .filter(|a| a.status == 200 && a.body["status"] == "approved")
        .count();
    let conflicts = answers.iter().filter(|a| a.status == 409).count();
    assert_eq!(approved, 1);
    assert_eq!(conflicts, 49);
}

#[tokio::test]
async fn a_resend_within_the_cooldown_is_refused_with_retry_after() {
    let app = spawn_app().await;
    let first = app.start_sms(PHONE).await;
    app.clock.advance(Duration::from_secs(10));
    let early = app.start_sms(PHONE).await;
    assert_eq!(early.status, 429);
    assert_eq!(early.body["code"], "rate_limited");
    assert_eq!(early.body["retry_after"], 20);
    assert_eq!(early.headers["retry-after"], "20");
    assert_eq!(
        app.sends_to(PHONE).await,
        1,
        "a refused resend queued a message"
    );
    app.clock.advance(Duration::from_secs(21));
    let resent = app.start_sms(PHONE).await;
    assert_eq!(resent.status, 201);
    assert_eq!(resent.body["id"], first.body["id"]);
    assert_eq!(resent.body["send_count"], 2);
    // Only the newest code works.
    let old = app.delivered_code(PHONE, 1).await;
    let new = app.delivered_code(PHONE, 2).await;
    let id = resent.body["id"].as_str().unwrap();
    if old != new {
        assert_eq!(app.check(id, &old).await.body["status"], "pending");
    }
    assert_eq!(app.check(id, &new).await.body["status"], "approved");
}

#[tokio::test]
async fn sends_to_one_destination_are_capped_per_window() {
    let app = spawn_app().await;
    for _ in 0..5 {
        assert_eq!(app.start_sms(PHONE).await.status, 201);
        app.clock.advance(Duration::from_secs(31));
    }
    let sixth = app.start_sms(PHONE).await;
    assert_eq!(sixth.status, 429);
    assert_eq!(app.sends_to(PHONE).await, 5);
}

#[tokio::test]
async fn a_canceled_verification_no_longer_approves() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    let canceled = app.cancel(&id).await;
    assert_eq!(canceled.status, 200);
    assert_eq!(canceled.body["status"], "canceled");
    assert_eq!(app.check(&id, &code).await.body["status"], "canceled");
    assert_eq!(app.cancel(&id).await.status, 409);
}

#[tokio::test]
async fn an_expired_code_is_refused() {
    let app = spawn_app().await;
    let id = app.start_sms(PHONE).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let code = app.delivered_code(PHONE, 1).await;
    app.clock.advance(Duration::from_secs(5 * 60));
    assert_eq!(app.check(&id, &code).await.body["status"], "expired");
    assert_eq!(app.get_verification(&id).await.body["status"], "expired");
}

#[tokio::test]
async fn email_verifications_live_ten_minutes() {
    let app = spawn_app().await;
    let started = app
        .start_verification(json!({"to": "Ali@Example.com", "channel": "email", "locale": "fa-IR"}))
        .await;
    assert_eq!(started.status, 201);
    assert_eq!(started.body["to"], "Ali@example.com");
    let code = app.delivered_code("Ali@example.com", 1).await;
    let message = app.sender.messages().pop().unwrap();
    assert!(
        message.body.unwrap().contains("کد"),
        "the Persian template was not used"
    );
    app.clock.advance(Duration::from_secs(9 * 60));
    let id = started.body["id"].as_str().unwrap();
    assert_eq!(app.check(id, &code).await.body["status"], "approved");
}
