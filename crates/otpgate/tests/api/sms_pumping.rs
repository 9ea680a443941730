//! SMS pumping defence over HTTP: numbers the plan marks premium-rate or not mobile are refused,
//! and a number range whose codes are rarely verified is paused by the circuit breaker; every
//! decision shows in the audit trail and in `/metrics`.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{TestApp, spawn_app};
use crate::v1_tenant::set;

async fn refused_events(app: &TestApp) -> Vec<String> {
    let answer = app
        .send(
            app.client
                .get(app.url("/v1/events?kind=send_refused"))
                .bearer_auth(&app.api_key),
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    answer.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap().to_owned())
        .collect()
}

/// The value of one counter series in `/metrics` (0 when it has not been counted yet).
async fn counter(app: &TestApp, series: &str) -> u64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const NUMBER_TYPE_SERIES: &str =
    r#"otpgate_send_decisions_total{channel="sms",decision="number_type"}"#;
const CIRCUIT_SERIES: &str =
    r#"otpgate_send_decisions_total{channel="sms",decision="circuit_open"}"#;

#[tokio::test]
async fn premium_rate_and_landline_numbers_get_no_sms() {
    let app = spawn_app().await;
    let before = counter(&app, NUMBER_TYPE_SERIES).await;
    for number in [
        "+449012345678",
        "+19002345678",
        "+442079460000",
        "+18002345678",
    ] {
        let refused = app.start_sms(number).await;
        assert_eq!(
            (refused.status, refused.body["code"].as_str()),
            (400, Some("invalid_input")),
            "{number}: {:?}",
            refused.body
        );
        assert_eq!(app.sends_to(number).await, 0, "{number} got a message");
    }
    assert_eq!(
        app.start_sms("+447911123456").await.status,
        201,
        "UK mobile"
    );
    let events = refused_events(&app).await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("number_type: premium_rate number in +44901")),
        "{events:?}"
    );
    assert!(counter(&app, NUMBER_TYPE_SERIES).await >= before + 4);

    // A tenant may take landlines (a voice-to-text gateway); premium rate stays refused.
    set(&app, json!({"refuse_non_mobile_numbers": false})).await;
    assert_eq!(app.start_sms("+442079460000").await.status, 201);
    assert_eq!(app.start_sms("+449012345678").await.status, 400);
}

#[tokio::test]
async fn a_range_whose_codes_are_not_verified_is_paused_and_resumes_after_the_window() {
    let app = spawn_app().await;
    set(
        &app,
        json!({"pumping_min_sample": 5, "pumping_min_verified_percent": 50}),
    )
    .await;
    // A healthy range: every code is verified.
    for i in 0..5 {
        let to = format!("+98913000000{i}");
        let started = app.start_sms(&to).await;
        let code = app.delivered_code(&to, 1).await;
        let id = started.body["id"].as_str().unwrap();
        assert_eq!(app.check(id, &code).await.body["status"], "approved");
    }
    // A pumped range: codes go out and nobody ever enters one.
    for i in 0..5 {
        assert_eq!(app.start_sms(&format!("+98912000000{i}")).await.status, 201);
    }
    // Still pending codes say nothing yet.
    assert_eq!(app.start_sms("+989120000005").await.status, 201);
    app.clock.advance(Duration::from_secs(301));
    let before = counter(&app, CIRCUIT_SERIES).await;

    let refused = app.start_sms("+989120000006").await;
    assert_eq!(
        (refused.status, refused.body["retry_after"].as_u64()),
        (429, Some(3600)),
        "{:?}",
        refused.body
    );
    assert_eq!(refused.headers["retry-after"], "3600");
    assert_eq!(app.sends_to("+989120000006").await, 0);
    assert_eq!(
        app.start_sms("+989130000009").await.status,
        201,
        "the healthy range is not paused"
    );
    assert_eq!(
        app.start_sms("+989350000001").await.status,
        201,
        "another operator's range is not paused"
    );
    let events = refused_events(&app).await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("circuit_open: +98912: 0 of 6 codes verified")),
        "{events:?}"
    );
    assert!(counter(&app, CIRCUIT_SERIES).await > before);

    // Once the window's sends age out, the range gets SMS again.
    app.clock.advance(Duration::from_secs(3600));
    assert_eq!(app.start_sms("+989120000006").await.status, 201);
}
