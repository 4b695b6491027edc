//! `order-api` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;

use order_api::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    let _telemetry = match lifecycle::init_telemetry("order-api", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    lifecycle::serve("order-api", |shutdown| order_api::run(cfg, shutdown))
}
