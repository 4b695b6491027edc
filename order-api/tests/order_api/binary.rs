//! The `order-api` binary: `--help` lists every option with its environment
//! variable; it serves with the config from the environment and exits 0 on
//! SIGTERM; an unusable config is a clear error, not a hang.

use std::process::{Command, Stdio};
use std::time::Duration;

use devstack::testing::{wait_for, TestDb};

const BIN: &str = env!("CARGO_BIN_EXE_order-api");

#[test]
fn help_shows_every_option_with_its_env_var() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for env in [
        "ORDER_API_LISTEN",
        "DATABASE_URL",
        "ORDER_API_POOL_SIZE",
        "ORDER_API_POOL_TIMEOUT",
        "ORDER_API_REQUEST_TIMEOUT",
        "ORDER_API_BODY_LIMIT",
        "ORDER_API_IDEMPOTENCY_TTL",
        "ORDER_API_SHUTDOWN_TIMEOUT",
        "ORDER_API_OUTBOX_MODE",
        "ORDER_API_OUTBOX_MESSAGE_PREFIX",
    ] {
        assert!(
            help.contains(&format!("env: {env}")),
            "{env} missing:\n{help}"
        );
    }
    assert!(help.contains("127.0.0.1:8080"), "{help}");
}

#[test]
fn an_unsupported_database_url_is_a_clear_startup_error() {
    let out = Command::new(BIN)
        .env(
            "DATABASE_URL",
            "postgres://u:secret@127.0.0.1:1/db?sslmode=sometimes",
        )
        .env("ORDER_API_LISTEN", "127.0.0.1:0")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unsupported sslmode"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

#[tokio::test]
async fn serves_from_env_config_and_exits_cleanly_on_sigterm() {
    let db = TestDb::create().await.expect("db");
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut child = tokio::process::Command::new(BIN)
        .env("DATABASE_URL", &db.url)
        .env("ORDER_API_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for("readyz", Duration::from_secs(20), || {
        let (http, url) = (http.clone(), format!("{base}/readyz"));
        async move {
            Ok(match http.get(url).send().await {
                Ok(r) if r.status() == 200 => Some(()),
                _ => None,
            })
        }
    })
    .await
    .expect("ready");
    let created = http
        .post(format!("{base}/orders"))
        .json(
            &serde_json::json!({"user_id": 1, "email": "a@b.c", "currency": "EUR",
            "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 5}]}),
        )
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);

    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status}");
}
