//! `otpgate rotate-master-key` on the real binary: every sealed secret moves to the new key,
//! stored code hashes keep matching, the old key no longer opens the database, and a rotation
//! interrupted before its key file was installed is finished at the next start.

use serde_json::{Value, json};

use crate::secrets::{create_user, login_and_enrol_totp, otpgate, post, start};

#[allow(clippy::disallowed_methods)] // the real server runs on the wall clock; so must its TOTP codes
fn totp_next_step(secret: &str) -> String {
    let bytes = otpgate_core::otp::secret_from_base32(secret).unwrap();
    otpgate_core::otp::TotpParams::default()
        .code_at(
            &bytes,
            time::OffsetDateTime::now_utc().unix_timestamp() + 30,
        )
        .unwrap()
}

fn rotate(dir: &std::path::Path, extra: &[&str]) -> Value {
    let out = otpgate(dir)
        .args(["--json", "rotate-master-key"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_master_key_reseals_every_secret_and_the_old_one_stops_working() {
    // Arrange: a user with an authenticator, a tenant JWT key, a code still pending.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("otpgate-data/master.key");
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let out = otpgate(dir.path())
        .args(["--json", "apikey", "create", "--name", "r"])
        .output()
        .unwrap();
    let api_key = serde_json::from_slice::<Value>(&out.stdout).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let password = "Correct-Horse-Battery-7";
    create_user(dir.path(), "ali", password, &["--phone", "+989121230000"]);
    let login = json!({"username": "ali", "password": password});
    let secret = login_and_enrol_totp(&server, "ali", password, "+989121230000")
        .await
        .totp_secret;
    let (_, _, pending) = post(
        &base,
        "/v1/verifications",
        Some(("Bearer", &api_key)),
        &[],
        json!({"to": "+989121239999", "channel": "sms"}),
    )
    .await;
    let pending_code = server.code("+989121239999", 1).await;
    assert!(
        otpgate(dir.path())
            .args(["tenant", "rotate-jwt-key"])
            .output()
            .unwrap()
            .status
            .success()
    );
    drop(server);
    let old_key = std::fs::read_to_string(&key_file).unwrap();

    // Act
    let rotation = rotate(dir.path(), &[]);

    // Assert: everything re-sealed, the new key installed, the old one refused.
    assert_eq!(rotation["resealed"]["totp_factors"], 1, "{rotation}");
    assert_eq!(rotation["resealed"]["server_secrets"], 1, "{rotation}");
    assert!(rotation["resealed"]["jwt_keys"].as_u64().unwrap() >= 1);
    assert_eq!(rotation["installed"], true);
    let new_key = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(new_key, old_key);
    assert!(!dir.path().join("otpgate-data/master.key.new").exists());
    let refused = otpgate(dir.path())
        .env("OTPGATE_MASTER_KEY", old_key.trim())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "the old key still opens the database"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("master key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The code sent before the rotation still matches; the authenticator still works.
    let server = start(dir.path()).await;
    let base = server.base.clone();
    let id = pending["id"].as_str().unwrap();
    let (_, _, checked) = post(
        &base,
        &format!("/v1/verifications/{id}/check"),
        Some(("Bearer", &api_key)),
        &[],
        json!({"code": pending_code}),
    )
    .await;
    assert_eq!(checked["status"], "approved", "{checked}");
    let (_, _, step1) = post(&base, "/api/acl/auth/login", None, &[], login.clone()).await;
    let ticket = step1["data"]["token"].as_str().unwrap().to_owned();
    let (status, _, _) = post(
        &base,
        "/api/acl/auth/confirm_otp",
        None,
        &[],
        json!({"token": ticket, "otp": totp_next_step(&secret)}),
    )
    .await;
    assert_eq!(status, 200, "the TOTP secret did not survive the rotation");
    drop(server);

    // A rotation whose key file was not installed yet (as after a crash between the commit
    // and the rename) is finished by the next start.
    let pending_file = dir.path().join("otpgate-data/master.key.new");
    let second = rotate(
        dir.path(),
        &["--new-key-file", pending_file.to_str().unwrap()],
    );
    assert_eq!(second["installed"], false);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), new_key);
    let newest = std::fs::read_to_string(&pending_file).unwrap();
    assert!(
        otpgate(dir.path())
            .arg("migrate")
            .output()
            .unwrap()
            .status
            .success()
    );
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), newest);
    assert!(!pending_file.exists());
}
