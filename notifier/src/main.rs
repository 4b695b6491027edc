//! `notifier` binary: parse config, init tracing, run until Ctrl-C or SIGTERM.

use notifier::config::Config;

fn main() -> std::process::ExitCode {
    let cfg = Config::from_command_line();
    let _telemetry = match lifecycle::init_telemetry("notifier", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let workers = cfg.worker_threads.map(usize::from);
    lifecycle::serve_with_workers("notifier", workers, |shutdown| notifier::run(cfg, shutdown))
}
