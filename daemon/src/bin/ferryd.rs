//! `ferryd`: ferry's per-host live-migration service (see docs/api.md).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ferry_daemon::config::{Args, Config};
use ferry_daemon::daemon;
use ferry_transport::tcp::TcpTransport;

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
    match daemon::run(cfg, Arc::new(TcpTransport::default())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("cannot run: {e}");
            ExitCode::FAILURE
        }
    }
}
