//! `notifier` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use notifier::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    lifecycle::init_logging(cfg.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("notifier: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(lifecycle::on_signal(shutdown.clone()));
        match notifier::run(cfg, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("notifier: {}", notifier::handler::error_chain(&e));
                std::process::ExitCode::FAILURE
            }
        }
    })
}
