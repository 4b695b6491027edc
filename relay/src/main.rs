//! `relay` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use relay::config::{Config, LogFormat};

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(relay::shutdown::on_signal(shutdown.clone()));
        // On a worker thread, not block_on's: there the pipeline polls the
        // sockets it waits on itself instead of being woken across threads
        // for every message.
        match tokio::spawn(relay::pipeline::run(cfg, shutdown)).await {
            Ok(Ok(())) => std::process::ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("relay: {}", relay::pipeline::error_chain(&e));
                std::process::ExitCode::FAILURE
            }
            Err(panic) => {
                eprintln!("relay: the pipeline task panicked: {panic}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
