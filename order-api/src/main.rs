//! `order-api` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

use order_api::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    lifecycle::init_logging(cfg.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("order-api: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(lifecycle::on_signal(shutdown.clone()));
        match order_api::run(cfg, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("order-api: {}", order_api::error_chain(&e));
                std::process::ExitCode::FAILURE
            }
        }
    })
}
