//! `notifier` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use clap::Parser;

use notifier::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    lifecycle::init_logging(cfg.log_format);
    lifecycle::serve("notifier", |shutdown| notifier::run(cfg, shutdown))
}
