//! What the project's binaries (relay, order-api, notifier, loadgen) share at
//! run time: one shutdown signal, Ctrl-C or SIGTERM, fanned out over a
//! cancellation token that every task owning state watches; logging set up
//! the same way (`RUST_LOG`, text or JSON, on stderr) and spans exported by
//! OTLP when the standard variables ask ([`telemetry`]); error chains for
//! messages; durations on the command line; and Kafka client properties
//! (`--kafka-property KEY=VALUE`, `--kafka-properties-file PATH`); with the
//! `kafka` feature, the Kafka errors every client treats alike ([`kafka`]);
//! with `http`, the HTTP server task and `/metrics` ([`http`]).

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod telemetry;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How the binaries write their logs (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logs and, when `OTEL_EXPORTER_OTLP_*` asks, span export for
/// the binary `name` ([`telemetry::init`]); on a bad setting, says why on
/// stderr and returns the failure exit code for `main`.
pub fn init_telemetry(name: &str, format: LogFormat) -> Result<telemetry::Telemetry, ExitCode> {
    telemetry::init(name, format).map_err(|e| {
        eprintln!("{name}: {}", error_chain(&e));
        ExitCode::FAILURE
    })
}

/// `err` and its causes, `: `-separated, for logs and exit messages
/// (`Display` of the project's errors leaves the cause out).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// Bounded exponential backoff with jitter: the one retry policy of every
/// binary (the relay's reconnects, the notifier's retries of a record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `attempt` (1-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::delay`] scaled by a random factor in [0.5, 1.0), so
    /// instances that failed together do not retry in lockstep.
    pub fn jittered(&self, attempt: u32) -> Duration {
        self.delay(attempt)
            .mul_f64(rand::random_range(0.5..1.0))
            .max(Duration::from_millis(1))
    }
}

/// Parses a duration option of any binary: humantime's grammar (`250ms`,
/// `5s`, `2m`, `24h`, `1h 30m`, …) or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("duration {s:?} is too long"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}): expected e.g. 250ms, 5s, 2m, 24h"))
}

/// The body of a service binary's `main`: a multi-thread runtime, `run`
/// on a worker thread with a token cancelled on Ctrl-C or SIGTERM, and the
/// exit status: failure, after `<name>: <error chain>` on stderr, if `run`
/// fails or panics.
///
/// On a worker thread rather than `block_on`'s: there a task polls the
/// sockets it waits on itself instead of being woken across threads.
pub fn serve<F, Fut, E>(name: &str, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    serve_with_workers(name, None, run)
}

/// [`serve`] on a runtime of `workers` worker threads (`None`: one per
/// core). A service whose work is one task runs best on one: with more,
/// each wake-up may move it to another thread, and those switches cost more
/// than the work (measured on the relay's catch-up: a quarter of its CPU).
pub fn serve_with_workers<F, Fut, E>(name: &str, workers: Option<usize>, run: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    block_on_with(name, workers, async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        match tokio::spawn(run(shutdown)).await {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("{name}: {}", error_chain(&e));
                ExitCode::FAILURE
            }
            Err(panic) => {
                eprintln!("{name}: the main task panicked: {panic}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs `command` (e.g. an operator subcommand) to completion on a new
/// runtime; failure if the runtime cannot start.
pub fn block_on(name: &str, command: impl Future<Output = ExitCode>) -> ExitCode {
    block_on_with(name, None, command)
}

/// [`block_on`] on a runtime of `workers` worker threads (`None`: one per
/// core).
fn block_on_with(
    name: &str,
    workers: Option<usize>,
    command: impl Future<Output = ExitCode>,
) -> ExitCode {
    let runtime = match workers {
        None => tokio::runtime::Runtime::new(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.max(1))
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(command),
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for Ctrl-C or SIGTERM, then cancels `token`.
pub async fn on_signal(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
}

/// `KEY=VALUE`: one Kafka client property on the command line
/// (`--kafka-property`).
pub fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// Kafka client properties read from a file (`--kafka-properties-file`),
/// so that secrets such as `sasl.password` stay out of the process list.
/// Its `Debug` shows the keys only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PropertiesFile {
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for PropertiesFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.properties.iter().map(|(k, _)| k))
            .finish()
    }
}

/// Reads a properties file: one `key=value` a line, as Kafka's own tools
/// take them (`--command-config`); blank lines and lines starting with `#`
/// or `!` are skipped, and whitespace around keys and values is trimmed.
/// Errors name the file and the line, never the line's text (it may hold a
/// secret).
pub fn parse_properties_file(path: &str) -> Result<PropertiesFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_properties(&text).map_err(|line| {
        format!("{path} line {line}: expected key=value (a comment starts with # or !)")
    })
}

/// The properties in `text`; `Err(n)` names the first malformed line.
fn parse_properties(text: &str) -> Result<PropertiesFile, usize> {
    let mut properties = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                properties.push((k.trim().to_owned(), v.trim().to_owned()));
            }
            _ => return Err(n + 1),
        }
    }
    Ok(PropertiesFile { properties })
}

/// The properties a client is configured with: the file's, then the
/// command line's, which win where both set a key.
pub fn kafka_properties(
    file: Option<&PropertiesFile>,
    command_line: &[(String, String)],
) -> Vec<(String, String)> {
    file.map(|f| f.properties.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(command_line)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(3), Duration::from_millis(400));
        assert_eq!(b.delay(10), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(5));
        for attempt in 1..40 {
            let j = b.jittered(attempt);
            assert!(j <= b.max && j >= Duration::from_millis(1));
        }
    }

    #[test]
    fn durations_in_humantime_or_bare_seconds() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        for bad in [
            "",
            "5 parsecs",
            "-1s",
            "99999999999999999999",
            "99999999999999999999h",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn properties_file_lines() {
        let text =
            "# SASL\n\nsecurity.protocol = SASL_SSL\n! old style comment\nsasl.password=a=b \n";
        let file = parse_properties(text).expect("valid");
        assert_eq!(
            file.properties,
            vec![
                ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
                ("sasl.password".to_owned(), "a=b".to_owned()),
            ]
        );
        assert_eq!(
            format!("{file:?}"),
            r#"["security.protocol", "sasl.password"]"#,
            "Debug shows keys, not values"
        );
        assert_eq!(parse_properties("a=1\nsecret-without-equals\n"), Err(2));
        assert_eq!(parse_properties(" =x"), Err(1));
    }

    #[test]
    fn properties_file_errors_name_file_and_line_not_text() {
        let dir = std::env::temp_dir().join(format!("lifecycle-props-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("client.properties");
        std::fs::write(&path, "sasl.username=relay\nhunter2\n").expect("write");
        let path = path.to_str().expect("utf-8 path");
        let err = parse_properties_file(path).expect_err("malformed");
        assert!(err.contains(path) && err.contains("line 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let missing = parse_properties_file("/nonexistent/client.properties").expect_err("missing");
        assert!(
            missing.contains("cannot read /nonexistent/client.properties"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn command_line_properties_come_last() {
        let file = PropertiesFile {
            properties: vec![("acks".into(), "1".into()), ("a".into(), "x".into())],
        };
        let cli = vec![("acks".to_owned(), "all".to_owned())];
        assert_eq!(
            kafka_properties(Some(&file), &cli),
            vec![
                ("acks".to_owned(), "1".to_owned()),
                ("a".to_owned(), "x".to_owned()),
                ("acks".to_owned(), "all".to_owned()),
            ]
        );
        assert_eq!(kafka_properties(None, &cli), cli);
    }
}
