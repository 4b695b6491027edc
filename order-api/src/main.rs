//! `order-api` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;

use order_api::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    lifecycle::init_logging(cfg.log_format);
    lifecycle::serve("order-api", |shutdown| order_api::run(cfg, shutdown))
}
