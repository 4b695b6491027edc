//! `notifier` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use notifier::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::from_command_line();
    let _telemetry = match lifecycle::init_telemetry("notifier", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    lifecycle::serve("notifier", |shutdown| notifier::run(cfg, shutdown))
}
