//! What ferry-bench tells a person while it runs: step lines on stderr, and a
//! live progress line when stderr is a terminal (never under `CI=true`).

use std::io::{IsTerminal, Write};

/// Where messages go and whether a live line is allowed.
#[derive(Clone, Copy, Debug)]
pub struct Ui {
    live: bool,
    live_shown: bool,
}

impl Ui {
    /// Decides from the environment: a live line needs a terminal on stderr
    /// and no `CI=true`.
    pub fn from_env() -> Self {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        Ui {
            live: std::io::stderr().is_terminal() && !ci,
            live_shown: false,
        }
    }

    /// Whether stdout is a terminal (a table reads better there).
    pub fn stdout_is_terminal() -> bool {
        std::io::stdout().is_terminal()
    }

    /// One line about a step.
    pub fn step(&self, msg: &str) {
        eprintln!("ferry-bench: {msg}");
    }

    /// Replaces the live line (terminal only).
    pub fn live(&mut self, msg: &str) {
        if self.live {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K{msg}");
            let _ = e.flush();
            self.live_shown = true;
        }
    }

    /// Clears the live line, if one is shown.
    pub fn end_live(&mut self) {
        if self.live_shown {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[K");
            let _ = e.flush();
            self.live_shown = false;
        }
    }
}
