//! ferry-bench: whole-migration benchmarks on this machine.
//!
//! `ferry-bench migrate` starts a target and a source ferryd (on loopback, or
//! in two network namespaces joined by a veth pair), a source ferry-vmm with
//! a chosen guest workload, measures the raw link, migrates the VM over the
//! daemons' API, and checks the result without trusting the migration code.
//!
//! - [`api`]: a client for ferryd's HTTP-over-unix-socket control API.
//! - [`blast`]: the raw TCP baseline (hidden `blast-send` / `blast-recv`).
//! - [`compare`]: `ferry-bench compare`, every (transport, streams) pair
//!   migrated K times in alternating order, with a table, a JSON file and a
//!   chart (SVG and PNG).
//! - [`netns`]: the namespace pair.
//! - [`migrate`]: the scenario, its checks and its report.
//! - [`policies`]: `ferry-bench policies`, every (workload, policy) pair
//!   migrated K times, with a table, a JSON file and an SVG chart.
//! - [`procs`]: child processes, scratch directory, Ctrl-C; all Drop guards.
//! - [`rdma`]: the RDMA devices of an rdma run, and whether they are
//!   software emulations (whose rates mean nothing for RDMA hardware).

pub mod api;
pub mod blast;
pub mod compare;
pub mod experiment;
pub mod faults;
pub mod migrate;
pub mod netns;
pub mod policies;
pub mod procs;
pub mod ratio;
pub mod rdma;
pub mod ui;
pub mod workload;
