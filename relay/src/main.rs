//! `relay` binary: parse config, init tracing, run until Ctrl-C or SIGTERM;
//! or, with `relay slot status|drop`, an operator command.

use clap::Parser;

use relay::config::{Command, Config, SlotAction};
use relay::{slot_admin, verify};

fn main() -> std::process::ExitCode {
    let cfg = Config::parse();
    let _telemetry = match lifecycle::init_telemetry("relay", cfg.log_format) {
        Ok(t) => t,
        Err(code) => return code,
    };
    match cfg.command.clone() {
        Some(Command::Slot { action }) => {
            return lifecycle::block_on("relay", slot_command(&cfg, action))
        }
        Some(Command::Verify {
            from_id,
            to_id,
            since,
            until,
            time_column,
            json,
            wait,
            republish_missing,
        }) => {
            let range = verify::Range {
                from_id,
                to_id,
                since,
                until,
                time_column,
                wait,
                republish: republish_missing,
            };
            return lifecycle::block_on("relay", verify_command(&cfg, range, json));
        }
        None => {}
    }
    let workers = Some(usize::from(cfg.worker_threads));
    lifecycle::serve_with_workers("relay", workers, |shutdown| {
        relay::pipeline::run(cfg, shutdown)
    })
}

/// `relay verify`: 0 when nothing is wrong, 1 when something is, 2 when
/// the comparison could not be made.
async fn verify_command(cfg: &Config, range: verify::Range, json: bool) -> std::process::ExitCode {
    match verify::verify(cfg, &range).await {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{report}");
            }
            std::process::ExitCode::from(if report.ok { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("relay: {}", relay::pipeline::error_chain(&e));
            std::process::ExitCode::from(2)
        }
    }
}

async fn slot_command(cfg: &Config, action: SlotAction) -> std::process::ExitCode {
    let params = match relay::replication::connect_params(&cfg.database_url) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("relay: {}", relay::pipeline::error_chain(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match action {
        SlotAction::Status { json } => slot_admin::status(&params, &cfg.slot).await.map(|info| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).unwrap_or_default()
                );
            } else {
                println!("{info}");
            }
        }),
        SlotAction::Drop { yes } => {
            slot_admin::drop_slot(&params, &cfg.slot, yes)
                .await
                .map(|info| {
                    println!(
                    "dropped slot {} (it had confirmed {}; changes after that will not be relayed)",
                    info.slot,
                    info.confirmed_flush_lsn.as_deref().unwrap_or("nothing")
                );
                })
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {}", relay::pipeline::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
