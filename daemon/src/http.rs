//! HTTP plumbing of the control API over tiny_http on the unix control socket:
//! a few worker threads take requests, cap bodies, and answer JSON.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server};

use crate::api;
use crate::daemon::Daemon;
use crate::util::panic_message;

/// Cap on a request body: a migration request is ~200 bytes.
pub const BODY_BYTES_MAX: usize = 64 << 10;
/// Worker threads. A request is answered in microseconds except `GET /vms`,
/// which asks each idle VMM for stats (bounded by `vms::STATS_TIMEOUT`); four
/// workers keep `ping` answering while a few such queries hang.
pub const WORKERS: usize = 4;
/// How often an idle worker checks for shutdown.
const POLL: Duration = Duration::from_millis(500);

/// Starts the workers; they return once `d.shutdown` is set.
pub fn serve(d: &Arc<Daemon>, server: &Arc<Server>) -> Vec<JoinHandle<()>> {
    (0..WORKERS)
        .filter_map(|i| {
            let (d, server) = (Arc::clone(d), Arc::clone(server));
            std::thread::Builder::new()
                .name(format!("api-{i}"))
                .spawn(move || worker(&d, &server))
                .map_err(|e| tracing::error!("cannot start API worker {i}: {e}"))
                .ok()
        })
        .collect()
}

fn worker(d: &Arc<Daemon>, server: &Server) {
    while !d.shutdown.load(Ordering::SeqCst) {
        match server.recv_timeout(POLL) {
            Ok(Some(rq)) => answer(d, rq),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("control socket: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn answer(d: &Arc<Daemon>, mut rq: Request) {
    let method = rq.method().as_str().to_string();
    let url = rq.url().to_string();
    let (status, body) = match read_body(&mut rq) {
        Err(e) => (e.status, api::error_body(&e.message)),
        Ok(body) if matches!(rq.method(), Method::Get | Method::Post) => {
            let call = std::panic::AssertUnwindSafe(|| api::route(d, &method, &url, &body));
            std::panic::catch_unwind(call).unwrap_or_else(|panic| {
                tracing::error!("{method} {url} panicked: {}", panic_message(&panic));
                (
                    500,
                    api::error_body("ferryd failed to handle the request; see its log"),
                )
            })
        }
        Ok(_) => (
            405,
            api::error_body(&format!("{method} is not allowed on {url}")),
        ),
    };
    tracing::debug!("{method} {url} -> {status}");
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::from_data(bytes)
        .with_status_code(status)
        // Always Content-Length, never chunked: clients read to EOF anyway.
        .with_chunked_threshold(usize::MAX);
    if let Ok(h) = Header::from_bytes("Content-Type", "application/json") {
        response.add_header(h);
    }
    if let Err(e) = rq.respond(response) {
        tracing::debug!("cannot answer {method} {url}: {e}");
    }
}

fn read_body(rq: &mut Request) -> Result<Vec<u8>, api::ApiError> {
    let too_large = || api::ApiError {
        status: 413,
        message: format!("request body over the {BODY_BYTES_MAX}-byte cap"),
    };
    if rq.body_length().is_some_and(|n| n > BODY_BYTES_MAX) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    rq.as_reader()
        .take(BODY_BYTES_MAX as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| api::ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > BODY_BYTES_MAX {
        return Err(too_large());
    }
    Ok(body)
}
