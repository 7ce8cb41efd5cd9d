//! `ferryd`: ferry's per-host live-migration service (see docs/api.md).

use std::process::ExitCode;

use clap::Parser;
use ferry_daemon::config::{Args, Config};
use ferry_daemon::daemon;
use ferry_daemon::transports;

fn main() -> ExitCode {
    let cfg = match Config::resolve(Args::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("ferryd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = daemon::init_logging(cfg.log_level.as_deref()) {
        eprintln!("ferryd: {e}");
        return ExitCode::from(2);
    }
    let transport = match transports::get(cfg.transport, &cfg.rdma) {
        Ok(t) => t,
        // The error names the transport and says why, in one line.
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match daemon::run(cfg, transport) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot run: {e}");
            ExitCode::FAILURE
        }
    }
}
