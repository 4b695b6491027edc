//! `notifier` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;

use notifier::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    let _telemetry = match lifecycle::init_telemetry("notifier", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    lifecycle::serve("notifier", |shutdown| notifier::run(cfg, shutdown))
}
