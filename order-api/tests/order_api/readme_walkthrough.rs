//! The README's order-api curl walk-through, run verbatim with bash against
//! a fresh in-process service, so the README cannot rot.

use crate::common::Api;
use serde_json::Value;

/// The first `sh` block of README.md's "## order-api" section that uses
/// `ORDER_API_URL`.
fn walkthrough() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## order-api\n")
        .expect("an order-api section");
    let section = &readme[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |i| i + 1)];
    section
        .split("```sh\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("\n```").map(|(block, _)| block))
        .find(|block| block.contains("ORDER_API_URL"))
        .expect("a sh block using ORDER_API_URL in the order-api section")
        .to_owned()
}

/// Splits `… HTTP 201` into the body and the status.
fn body_and_status(line: &str) -> (&str, u16) {
    let (body, code) = line.rsplit_once(" HTTP ").expect("a status");
    (body, code.trim().parse().expect("a numeric status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_runs_as_written() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("the README walk-through needs curl");
    }
    let api = Api::start().await;
    let script = walkthrough();
    let out = tokio::process::Command::new("bash")
        .args(["-e", "-u", "-o", "pipefail", "-c", &script])
        .env("ORDER_API_URL", &api.base)
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "walk-through failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains(" HTTP ")).collect();
    let answers: Vec<(&str, u16)> = lines.iter().map(|l| body_and_status(l)).collect();
    let statuses: Vec<u16> = answers.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, [201, 200, 200, 200, 409, 422, 201], "{stdout}");

    let created: Value = serde_json::from_str(answers[0].0).expect("created JSON");
    let id = created["id"].as_i64().expect("id");
    let got: Value = serde_json::from_str(answers[1].0).expect("get JSON");
    assert_eq!(got, created);
    let page: Value = serde_json::from_str(answers[2].0).expect("list JSON");
    assert_eq!(page["orders"][0]["id"], id);
    let paid: Value = serde_json::from_str(answers[3].0).expect("paid JSON");
    assert_eq!(paid["status"], "PAID");
    let illegal: Value = serde_json::from_str(answers[4].0).expect("problem JSON");
    assert_eq!(illegal["type"], "urn:order-api:problem:illegal-transition");
    let invalid: Value = serde_json::from_str(answers[5].0).expect("problem JSON");
    assert_eq!(invalid["field"], "currency");
    // The retry is the first response, byte for byte.
    assert_eq!(answers[6].0, answers[0].0);

    assert_eq!(api.count("orders").await, 1);
    let events: Vec<String> = api.outbox().await.into_iter().map(|(t, _)| t).collect();
    assert_eq!(events, ["OrderCreated", "OrderStatusChanged"]);
    api.stop().await;
}
