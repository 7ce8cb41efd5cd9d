//! `ferryd`, the per-host migration service, and `ferry`, its command line.
//!
//! ```text
//!           ferry (CLI)                      source VMM              target VMM (spawned)
//!               │ HTTP/1.1 + JSON                │ link protocol           │ link protocol
//!               ▼ control socket (0600)          ▼ link socket (0600)      ▼
//!   ┌──────────────────────────────────── ferryd ───────────────────────────────────────┐
//!   │ api: routes ──▶ vms (VM table) ◀── linkserver (Register, token hand-over)         │
//!   │        │            ▲  ▲                                                          │
//!   │        ▼            │  └──────────── incoming: TCP listener ─▶ admit ─▶ migrate_in│
//!   │   migrations: one thread per outgoing migration ─▶ engine::source::migrate_out    │
//!   └───────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! - [`config`]: flags and the JSON config file of `ferryd`.
//! - [`daemon`]: start-up, the shared state, shutdown on SIGTERM/SIGINT.
//! - [`api`] / [`http`]: the control API (routes, request and response types) and
//!   its HTTP plumbing over tiny_http.
//! - [`vms`]: the table of VMs this host knows, and the link watchers that notice
//!   a VMM going away.
//! - [`migrations`]: outgoing migrations and the table of all migrations.
//! - [`incoming`]: the TCP data listener, admission of connections, incoming
//!   migrations and the target VMMs they spawn.
//! - [`linkserver`]: the unix socket VMMs register on.
//! - [`client`] / [`cli`]: `ferry`'s HTTP client and commands.
//!
//! Locks guard tables only and are never held across I/O: a VMM's link is
//! taken out of the VM table while a thread talks to it.

pub mod api;
pub mod cli;
pub mod client;
pub mod concluded;
pub mod config;
pub mod daemon;
pub mod http;
pub mod incoming;
pub mod indoubt;
pub mod journal;
pub mod linkserver;
pub mod migrations;
pub mod transports;
pub mod util;
pub mod vms;
