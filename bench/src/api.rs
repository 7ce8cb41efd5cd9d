//! ferryd's control API as ferry-bench uses it: a thin typed layer over the
//! daemon crate's own client and request/response types, so the benchmark
//! speaks exactly what `ferry` speaks.

use std::path::Path;

use anyhow::{Context, Result};
use ferry_daemon::api::{Created, MigrateRequest, Ping, VmInfo};
use ferry_daemon::client::{Client as DaemonClient, ClientError};

/// A client for one ferryd's control socket.
#[derive(Clone, Debug)]
pub struct Client {
    inner: DaemonClient,
    socket: String,
}

impl Client {
    /// A client for the control socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Client {
            inner: DaemonClient::new(socket),
            socket: socket.display().to_string(),
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.inner
            .get(path)
            .with_context(|| format!("GET {path} on {}", self.socket))
    }

    /// `GET /api/v1/ping`.
    pub fn ping(&self) -> Result<Ping> {
        self.get("/api/v1/ping")
    }

    /// `GET /api/v1/vms`.
    pub fn vms(&self) -> Result<Vec<VmInfo>> {
        self.get("/api/v1/vms")
    }

    /// `GET /api/v1/vms/{name}`; `None` when ferryd does not know the VM.
    pub fn vm(&self, name: &str) -> Result<Option<VmInfo>> {
        let path = format!("/api/v1/vms/{name}");
        match self.inner.get(&path) {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("GET {path} on {}", self.socket)),
        }
    }

    /// `POST /api/v1/migrations`; returns the migration id.
    pub fn start_migration(&self, req: &MigrateRequest) -> Result<String> {
        let c: Created = self
            .inner
            .call("POST", "/api/v1/migrations", Some(req))
            .with_context(|| format!("cannot start the migration of {} to {}", req.vm, req.to))?;
        Ok(c.id)
    }

    /// `GET /api/v1/migrations/{id}`.
    pub fn migration(&self, id: &str) -> Result<ferry_engine::Snapshot> {
        self.get(&format!("/api/v1/migrations/{id}"))
    }

    /// `POST /api/v1/migrations/{id}/cancel`.
    pub fn cancel(&self, id: &str) -> Result<()> {
        let _: Created = self
            .inner
            .call(
                "POST",
                &format!("/api/v1/migrations/{id}/cancel"),
                None::<&()>,
            )
            .with_context(|| format!("cannot cancel migration {id}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// A server that answers each connection with the next canned response
    /// and records each request line with its body.
    fn serve(
        responses: Vec<String>,
    ) -> (
        crate::procs::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        let dir = crate::procs::TempDir::new().unwrap();
        let sock = dir.path().join("control.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for resp in responses {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                seen.push(format!(
                    "{}{}",
                    line.trim_end(),
                    String::from_utf8(body).unwrap()
                ));
                r.get_mut().write_all(resp.as_bytes()).unwrap();
            }
            seen
        });
        (dir, sock, h)
    }

    fn answer(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn typed_calls_against_a_test_server() {
        let snapshot = serde_json::to_string(&ferry_engine::Snapshot {
            id: "m1".into(),
            status: ferry_engine::Status::Completed,
            streams: 4,
            ..Default::default()
        })
        .unwrap();
        let vm = r#"{"id":"a1","name":"vm0","mem_bytes":268435456,"vcpus":1,"state":"running",
                     "epoch":0,"progress":17,"phase":"idle","migration":null}"#;
        let (_d, sock, h) = serve(vec![
            answer(
                "200 OK",
                r#"{"version":"0.1.0","listen":"127.0.0.1:7070","pid":42}"#,
            ),
            answer("200 OK", &format!("[{vm}]")),
            answer(
                "404 Not Found",
                r#"{"error":"no VM named \"vm1\" on this host"}"#,
            ),
            answer("201 Created", r#"{"id":"m1"}"#),
            answer("409 Conflict", r#"{"error":"vm0 is already migrating"}"#),
            // No Content-Length: the body ends at EOF.
            format!("HTTP/1.1 200 OK\r\n\r\n{snapshot}"),
            answer("202 Accepted", r#"{"id":"m1"}"#),
        ]);
        let c = Client::new(&sock);
        let p = c.ping().unwrap();
        assert_eq!((p.listen.as_str(), p.pid), ("127.0.0.1:7070", 42));
        let vms = c.vms().unwrap();
        assert_eq!(
            (
                vms[0].name.as_str(),
                vms[0].progress,
                vms[0].phase.as_deref()
            ),
            ("vm0", Some(17), Some("idle"))
        );
        assert!(c.vm("vm1").unwrap().is_none());
        let req = MigrateRequest {
            vm: "vm0".into(),
            to: "127.0.0.1:7071".into(),
            streams: Some(4),
            downtime_ms: Some(300),
            ..Default::default()
        };
        assert_eq!(c.start_migration(&req).unwrap(), "m1");
        let e = format!("{:#}", c.start_migration(&req).unwrap_err());
        assert!(e.contains("already migrating"), "{e}");
        let s = c.migration("m1").unwrap();
        assert_eq!((s.status, s.streams), (ferry_engine::Status::Completed, 4));
        c.cancel("m1").unwrap();
        let seen = h.join().unwrap();
        assert_eq!(seen[0], "GET /api/v1/ping HTTP/1.1");
        assert!(
            seen[3].starts_with("POST /api/v1/migrations HTTP/1.1{\"vm\":\"vm0\""),
            "{}",
            seen[3]
        );
        assert_eq!(seen[6], "POST /api/v1/migrations/m1/cancel HTTP/1.1");
    }

    #[test]
    fn connect_error_names_the_socket() {
        let e = Client::new(Path::new("/nonexistent/ferry.sock"))
            .ping()
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("/nonexistent/ferry.sock"),
            "{e:#}"
        );
    }
}
