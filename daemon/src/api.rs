//! The control API: routes, request and response bodies, and errors.
//! docs/api.md is its reference; the types here are shared with the CLI.
//!
//! | method | path                              | success                |
//! |--------|-----------------------------------|------------------------|
//! | GET    | /api/v1/ping                      | 200 [`Ping`]           |
//! | GET    | /api/v1/vms                       | 200 array of [`VmInfo`] |
//! | GET    | /api/v1/vms/{name}                | 200 [`VmInfo`]         |
//! | POST   | /api/v1/migrations                | 201 [`Created`]        |
//! | GET    | /api/v1/migrations                | 200 array of [`Snapshot`] |
//! | GET    | /api/v1/migrations/{id}           | 200 [`Snapshot`]       |
//! | POST   | /api/v1/migrations/{id}/cancel    | 202 [`Created`]        |
//! | POST   | /api/v1/migrations/{id}/resume    | 202 [`Created`]        |
//!
//! Every error is `{"error": "<one sentence>"}` with its status code.
//!
//! [`Snapshot`]: ferry_engine::Snapshot

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::daemon::Daemon;
pub use crate::vms::{VmInfo, VmState};

/// Every path starts with this.
pub const API_PREFIX: &str = "/api/v1";

/// `GET /api/v1/ping`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ping {
    /// ferryd's version.
    pub version: String,
    /// The TCP data listener's actual address (real port when bound to 0).
    pub listen: String,
    /// ferryd's process id.
    pub pid: u32,
    /// Pre-faulted memory kept for incoming migrations (MiB, 0 = none).
    #[serde(default)]
    pub reserve_mib: u64,
    /// Whether that memory is filled and waiting.
    #[serde(default)]
    pub reserve_ready: bool,
}

/// `POST /api/v1/migrations`. Absent or null fields take their defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Name of the VM to move.
    pub vm: String,
    /// Target ferryd's data address, `HOST:PORT`.
    pub to: String,
    /// Data streams, 1..=64 (default 4).
    #[serde(default)]
    pub streams: Option<u32>,
    /// Downtime budget in ms, 1..=60000 (default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Send-rate cap in MiB/s, > 0 (default: none).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Give up after this many pre-copy rounds, 1..=1000 (default 30).
    #[serde(default)]
    pub rounds_max: Option<u32>,
    /// Give up after this many seconds, 1..=86400 (default 300).
    #[serde(default)]
    pub time_max_s: Option<u64>,
    /// Convergence policy: `baseline`, `mp`, `hot-defer`, `fragment`,
    /// `auto-converge` or `adaptive` (default `adaptive`).
    #[serde(default)]
    pub policy: Option<String>,
    /// `precopy` (default), `postcopy` (the VM moves right after its device
    /// state; memory follows on demand and in the background) or `hybrid`
    /// (pre-copy rounds, then post-copy when they do not converge).
    #[serde(default)]
    pub mode: Option<String>,
    /// Post-copy: how long to keep reconnecting after the connection to the
    /// target broke, seconds, 1..=3600 (default 60).
    #[serde(default)]
    pub postcopy_grace_s: Option<u64>,
    /// Post-copy: interval of the target's checkpoints, ms, 0 (none) or
    /// 10..=60000 (default 1000). Half the grace must cover two.
    #[serde(default)]
    pub checkpoint_ms: Option<u64>,
    /// Downtime a policy may spend to force convergence of a guest that
    /// dirties memory faster than the link carries it, ms (default 2000).
    #[serde(default)]
    pub downtime_max_ms: Option<u64>,
    /// Size of the XOR-delta cache of last-sent pages in MiB; 0 turns
    /// XOR-delta off (default: 1/8 of guest memory, at least 16 MiB).
    #[serde(default)]
    pub xor_cache_mib: Option<u64>,
    /// Disk bulk phase: only the blocks an ext4 file system in the image
    /// uses (default: all allocated extents).
    #[serde(default)]
    pub disk_fs_aware: bool,
    /// How this host sends: `tcp`, `uring` or `rdma` (default: ferryd's
    /// `--transport`; rdma with ferryd's `--rdma-*` settings).
    #[serde(default)]
    pub transport: Option<String>,
    /// Thread placement for this migration: `auto`, `off`, `cpus:LIST`,
    /// `nodes:LIST` (default: ferryd's `--placement`).
    #[serde(default)]
    pub placement: Option<String>,
}

/// The id of a created (or cancelled) migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// Migration id.
    pub id: String,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One sentence.
    pub error: String,
}

/// An error answer: status code and sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The sentence for `{"error": ...}`.
    pub message: String,
}

impl ApiError {
    /// 400: the request is malformed or a value is out of range.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
    /// 404: no such VM, migration, or endpoint.
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            message: message.into(),
        }
    }
    /// 409: the request does not fit the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: 409,
            message: message.into(),
        }
    }
    /// 500: ferryd failed.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            message: message.into(),
        }
    }
}

/// An answer: status code and JSON body.
pub type Reply = (u16, Value);

/// Routes one request. `path` may carry a query string (ignored).
pub fn route(d: &Arc<Daemon>, method: &str, path: &str, body: &[u8]) -> Reply {
    match dispatch(d, method, path, body) {
        Ok(reply) => reply,
        Err(e) => (e.status, error_body(&e.message)),
    }
}

/// `{"error": message}`.
pub fn error_body(message: &str) -> Value {
    serde_json::to_value(ErrorBody {
        error: message.into(),
    })
    .unwrap_or(Value::Null)
}

fn dispatch(d: &Arc<Daemon>, method: &str, path: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let rest = path.strip_prefix(API_PREFIX).ok_or_else(|| {
        ApiError::not_found(format!("no endpoint {path}; paths start with {API_PREFIX}"))
    })?;
    let segs: Vec<&str> = rest.trim_end_matches('/').split('/').skip(1).collect();
    let seg_str = segs.join("/");
    let wrong_method = || ApiError {
        status: 405,
        message: format!("{method} is not allowed on {path}"),
    };
    match segs.as_slice() {
        ["ping"] => match method {
            "GET" => ok(200, &ping(d)),
            _ => Err(wrong_method()),
        },
        ["vms"] => match method {
            "GET" => ok(200, &d.vms.list()),
            _ => Err(wrong_method()),
        },
        ["vms", name] => match method {
            "GET" => match d.vms.get(name) {
                Some(vm) => ok(200, &vm),
                None => Err(ApiError::not_found(format!(
                    "no VM named {name:?} on this host"
                ))),
            },
            _ => Err(wrong_method()),
        },
        ["migrations"] => match method {
            "GET" => ok(200, &d.migrations.list()),
            "POST" => {
                let req = parse_body::<MigrateRequest>(body)?;
                let id = crate::migrations::start_outgoing(d, req)?;
                ok(201, &Created { id })
            }
            _ => Err(wrong_method()),
        },
        ["migrations", id] => match method {
            "GET" => match d.migrations.get(id) {
                Some(m) => ok(200, &m.metrics.snapshot()),
                None => Err(ApiError::not_found(format!("no migration with id {id:?}"))),
            },
            _ => Err(wrong_method()),
        },
        ["migrations", id, "cancel"] => match method {
            "POST" => {
                d.migrations.cancel(id)?;
                ok(
                    202,
                    &Created {
                        id: (*id).to_string(),
                    },
                )
            }
            _ => Err(wrong_method()),
        },
        ["migrations", id, "resume"] => match method {
            "POST" => {
                crate::migrations::resume_recorded(d, id)?;
                ok(
                    202,
                    &Created {
                        id: (*id).to_string(),
                    },
                )
            }
            _ => Err(wrong_method()),
        },
        _ => Err(ApiError::not_found(format!(
            "no endpoint {API_PREFIX}/{seg_str}"
        ))),
    }
}

fn ping(d: &Daemon) -> Ping {
    Ping {
        version: env!("CARGO_PKG_VERSION").into(),
        listen: d.listen_addr.clone(),
        pid: std::process::id(),
        reserve_mib: d.reserve.as_ref().map_or(0, |r| r.bytes() >> 20),
        reserve_ready: d.reserve.as_ref().is_some_and(|r| r.ready()),
    }
}

fn ok(status: u16, v: &impl Serialize) -> Result<Reply, ApiError> {
    serde_json::to_value(v)
        .map(|v| (status, v))
        .map_err(|e| ApiError::internal(format!("cannot encode the answer: {e}")))
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}
