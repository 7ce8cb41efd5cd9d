//! Migrates an in-memory guest over TCP loopback and prints the metrics:
//! a quick way to see the engine's data path speed without KVM.
//!
//! `cargo run --release -p ferry-engine --example loopback -- <MiB> <streams> <fill|mixed|idle> [reserve]`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_engine::link::{RegionSpec, VmSpec};
use ferry_engine::memvm::{write_page, MemSourceVm, MemTargetVm, TargetLog};
use ferry_engine::source::{migrate_out, SourceConfig};
use ferry_engine::target::{migrate_in, Acceptor, TargetConfig};
use ferry_engine::{Cancel, GuestMem, Key, Metrics, PageIndex};
use ferry_transport::tcp::TcpTransport;
use ferry_transport::Transport;
use vm_memory::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let streams: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let kind = args.get(3).cloned().unwrap_or_else(|| "fill".into());
    let reserve = (args.get(4).map(String::as_str) == Some("reserve"))
        .then(|| ferry_engine::memory::Reserve::new(mib << 20));
    let spec = VmSpec {
        name: "vm0".into(),
        regions: vec![RegionSpec {
            gpa: 0,
            size: mib << 20,
            memfd_offset: 0,
        }],
        vcpus: 1,
        vmm_config: serde_json::Value::Null,
        disk: None,
    };
    let mem = Arc::new(GuestMem::create(&spec).unwrap());
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut buf = vec![0u8; 4096];
    for p in 0..mem.pages() {
        let class = if kind == "fill" {
            9
        } else if kind == "idle" {
            0
        } else {
            (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 10
        };
        match class {
            0..=3 => {}
            4..=6 => write_page(&mem, p, 1),
            _ => {
                for w in buf.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                mem.page(PageIndex(p))
                    .unwrap()
                    .write_slice(&buf, 0)
                    .unwrap();
            }
        }
    }
    let t = match std::env::var("FERRY_SOCKBUF_KIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(k) => TcpTransport::with_socket_buffer_bytes(std::num::NonZeroU32::new(k << 10)),
        None => TcpTransport::default(),
    };
    let mut listener = t.listen("127.0.0.1:0").unwrap();
    let addr = listener.local_addr();
    let key = Key::generate().unwrap();
    let acceptor = Acceptor::new(key.clone());
    while reserve.as_ref().is_some_and(|r| !r.ready()) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let tcfg = TargetConfig {
        reserve,
        ..TargetConfig::default()
    };
    let target = std::thread::spawn(move || loop {
        let conn = listener
            .accept(Some(Duration::from_secs(5)))
            .unwrap()
            .expect("a connection");
        if let Some(session) = acceptor.admit(conn).unwrap() {
            let metrics = Arc::new(Metrics::new(session.id(), "vm0", "target", session.peer()));
            let log = Arc::new(Mutex::new(TargetLog::default()));
            let out = migrate_in(session, &tcfg, metrics, |_, m, _| {
                Ok(MemTargetVm::new(m, log))
            })
            .unwrap();
            return out.epoch;
        }
    });
    let mut vm = MemSourceVm::new(mem.clone(), 0, 1);
    let cfg = SourceConfig {
        streams: streams.try_into().unwrap(),
        ..SourceConfig::default()
    };
    let metrics = Arc::new(Metrics::new("bench", "vm0", "source", &addr));
    if let Some(ms) = std::env::var("FERRY_WAIT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        eprintln!("ready; migrating in {ms} ms");
        std::thread::sleep(Duration::from_millis(ms));
    }
    let start = Instant::now();
    migrate_out(
        &t,
        &addr,
        &key,
        &spec,
        0,
        mem,
        &mut vm,
        &cfg,
        metrics.clone(),
        &Cancel::new(),
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    target.join().unwrap();
    let s = metrics.snapshot();
    println!("{s}");
    for r in &s.rounds {
        println!(
            "  round {}: {} pages in {} ms ({:.0} MiB/s): {}",
            r.round, r.pages, r.ms, r.rate_mib_s, r.decision
        );
    }
    println!("  verify: {} ms", s.verify_ms);
    println!(
        "effective: {:.0} MiB/s ({mib} MiB in {secs:.3} s)",
        mib as f64 / secs
    );
}
