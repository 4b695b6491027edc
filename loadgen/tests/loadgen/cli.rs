//! The binary's surface: `--help` lists every option with its environment
//! variable and default, and a bad configuration fails at once, clearly.

use std::process::Command;

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run loadgen")
}

#[test]
fn help_lists_every_option_with_env_and_default() {
    let out = loadgen(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // Each option's entry: its line and the description after it.
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with("--") || t.starts_with("-h,") || t.starts_with("-V,") {
            entries.push((t.to_owned(), String::new()));
        } else if let Some(e) = entries.last_mut() {
            e.1.push_str(t);
            e.1.push(' ');
        }
    }
    let options: Vec<_> = entries
        .iter()
        .filter(|(head, _)| !head.starts_with("-h,") && !head.starts_with("-V,"))
        .collect();
    assert!(options.len() >= 25, "{help}");
    for (head, text) in options {
        assert!(text.contains("[env: "), "{head} has no env var: {text}");
        assert!(text.contains("[default: "), "{head} has no default: {text}");
    }
    for needle in [
        "--rate",
        "--max-in-flight",
        "--warmup",
        "--ramp",
        "--drain-timeout",
        "--png",
    ] {
        assert!(help.contains(needle), "{needle} missing");
    }
}

#[test]
fn bad_configuration_fails_clearly() {
    for (args, needle) in [
        (&["--rate", "0"][..], "--rate must be a finite number > 0"),
        (
            &["--order-api-url", "localhost:8080"][..],
            "--order-api-url",
        ),
        (&["--mode", "sql"][..], "--database-url"),
    ] {
        let out = loadgen(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: no report on a config error"
        );
    }
}
