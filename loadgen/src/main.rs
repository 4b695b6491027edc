//! `loadgen` binary: parse config, init logging (stderr; the report goes to
//! stdout), run until the schedule ends or Ctrl-C/SIGTERM, print the report.
//! A second Ctrl-C exits at once, without a report.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use loadgen::config::Config;

fn main() -> ExitCode {
    let cfg = Config::parse();
    let _telemetry = match lifecycle::init_telemetry("loadgen", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    lifecycle::block_on("loadgen", async {
        let shutdown = CancellationToken::new();
        tokio::spawn(lifecycle::on_signal(shutdown.clone()));
        let first = shutdown.clone();
        tokio::spawn(async move {
            first.cancelled().await;
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("loadgen: interrupted again, exiting without a report");
                std::process::exit(130);
            }
        });
        match loadgen::run(cfg, shutdown).await {
            Ok(report) => {
                print!("{report}");
                for e in &report.output_errors {
                    eprintln!("loadgen: {e}");
                }
                if !report.output_errors.is_empty() {
                    ExitCode::FAILURE
                } else if !report.passed() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("loadgen: {}", loadgen::error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}
