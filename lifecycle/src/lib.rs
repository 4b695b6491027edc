//! What the project's binaries (relay, order-api, notifier, loadgen) share at
//! run time: one shutdown signal, Ctrl-C or SIGTERM, fanned out over a
//! cancellation token that every task owning state watches; logging set up
//! the same way (`RUST_LOG`, text or JSON, on stderr); error chains for
//! messages; and durations on the command line.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// How the binaries write their logs (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber, writing to stderr (stdout is
/// left to what a command prints, e.g. loadgen's report): filter from
/// `RUST_LOG` (default `info`), text or one JSON object per line.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
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

/// Parses `250ms`, `5s`, `2m` (a bare number means seconds): the form of
/// the relay's and the notifier's duration options.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 250ms, 5s, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too long")),
        _ => Err(format!("invalid duration {s:?}: unit must be ms, s or m")),
    }
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
    block_on(name, async move {
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
    match tokio::runtime::Runtime::new() {
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
