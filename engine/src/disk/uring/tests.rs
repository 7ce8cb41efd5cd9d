use super::*;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::OnceLock;

const SECS_10: Duration = Duration::from_secs(10);

/// A file under `dir`, removed on drop.
struct Temp {
    path: PathBuf,
    file: File,
}

impl Temp {
    /// `blocks` blocks: random content, or a sparse hole when !random.
    fn new(dir: &std::path::Path, tag: &str, blocks: u64, random: bool) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("ferry-uring-{}-{n}-{tag}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        if random {
            let mut data = vec![0u8; blocks as usize * BLOCK_BYTES];
            getrandom::fill(&mut data).unwrap();
            file.write_all_at(&data, 0).unwrap();
        } else {
            file.set_len(blocks * BLOCK_BYTES as u64).unwrap();
        }
        Self { path, file }
    }

    fn tmp(tag: &str, blocks: u64, random: bool) -> Self {
        Self::new(&std::env::temp_dir(), tag, blocks, random)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// xorshift64*: deterministic batches without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 1..=64 ascending blocks below `total`: mostly runs, some gaps.
fn random_batch(rng: &mut Rng, total: u64) -> Vec<u64> {
    let n = 1 + rng.below(BATCH_BLOCKS_MAX as u64) as usize;
    let mut b = rng.below(total);
    let mut v = Vec::with_capacity(n);
    while v.len() < n && b < total {
        v.push(b);
        b += 1 + if rng.below(4) == 0 { rng.below(5) } else { 0 };
    }
    v
}

/// The bytes a test writes into block `b`.
fn pattern(b: u64) -> Vec<u8> {
    let mut rng = Rng(b.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..BLOCK_BYTES / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect()
}

/// A deliver callback that compares each block with pread of `orig`,
/// counts blocks and recycles; a mismatch fails the reader.
fn checker(orig: &File) -> (Deliver, Arc<OnceLock<Recycler>>, Arc<AtomicUsize>) {
    let orig = orig.try_clone().unwrap();
    let recycler: Arc<OnceLock<Recycler>> = Arc::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let (r2, seen2) = (recycler.clone(), seen.clone());
    let deliver = move |batch: Batch| {
        let mut want = vec![0u8; BLOCK_BYTES];
        for (i, &b) in batch.blocks.iter().enumerate() {
            orig.read_exact_at(&mut want, b * BLOCK_BYTES as u64)
                .map_err(|e| e.to_string())?;
            if batch.buf.block(i) != &want[..] {
                return Err(format!("block {b} differs from pread"));
            }
        }
        seen2.fetch_add(batch.blocks.len(), Ordering::Relaxed);
        r2.get().ok_or("no recycler yet")?.give(batch.buf);
        Ok(())
    };
    (Box::new(deliver), recycler, seen)
}

fn checking_reader(
    file: &File,
    blocks: u64,
    buffers: usize,
    depth: u32,
    mode: DirectMode,
) -> (DiskReader, Arc<AtomicUsize>) {
    let (deliver, recycler, seen) = checker(file);
    let reader = DiskReader::start_with(file, blocks, buffers, depth, deliver, mode, None).unwrap();
    recycler.set(reader.recycler()).ok().unwrap();
    (reader, seen)
}

/// Which blocks SEEK_DATA / SEEK_HOLE report as data.
fn data_blocks(f: &File, blocks: u64) -> Vec<bool> {
    use nix::unistd::{lseek, Whence};
    let mut map = vec![false; blocks as usize];
    let end = (blocks * BLOCK_BYTES as u64) as i64;
    let mut off = 0;
    while off < end {
        let data = match lseek(f, off, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA: {e}"),
        };
        let hole = lseek(f, data, Whence::SeekHole).unwrap();
        let bb = BLOCK_BYTES as i64;
        for b in data / bb..(hole + bb - 1) / bb {
            map[b as usize] = true;
        }
        off = hole;
    }
    map
}

#[test]
fn buffers_are_aligned_and_runs_split_at_gaps() {
    let region = Region::new(3).unwrap();
    for index in 0..3 {
        let mut buf = BlockBuf {
            region: region.clone(),
            index,
        };
        assert!((buf.block(0).as_ptr() as usize).is_multiple_of(BLOCK_BYTES));
        assert_eq!(buf.blocks(BATCH_BLOCKS_MAX).len(), BUF_BYTES);
        buf.block_mut(63).fill(index as u8 + 1);
        assert!(buf.block(63).iter().all(|&x| x == index as u8 + 1));
    }
    let r = runs(&[1, 2, 3, 7, 9, 10]);
    let got: Vec<_> = r.iter().map(|r| (r.first, r.count)).collect();
    assert_eq!(got, [(0, 3), (3, 1), (4, 2)]);
}

#[test]
fn reads_of_random_batches_equal_pread() {
    let total = 2048;
    let img = Temp::tmp("rd", total, true);
    let (reader, seen) = checking_reader(&img.file, total, 16, 32, DirectMode::Try);
    eprintln!("O_DIRECT on {}: {}", img.path.display(), reader.direct());
    let mut rng = Rng(0x5eed);
    let mut want = 0;
    for i in 0..300u16 {
        let batch = random_batch(&mut rng, total);
        want += batch.len();
        reader.read(1 + i % 4, batch).unwrap();
    }
    reader.drain(SECS_10).unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), want);
    // The whole image, batch after batch, and the last block alone.
    for first in (0..total).step_by(BATCH_BLOCKS_MAX) {
        reader.read(1, (first..first + 64).collect()).unwrap();
    }
    reader.read(2, vec![total - 1]).unwrap();
    reader.drain(SECS_10).unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), want + total as usize + 1);
    reader.stop();
}

#[test]
fn many_batches_are_in_flight_at_once() {
    let batches = 49u64;
    let total = batches * BATCH_BLOCKS_MAX as u64;
    let img = Temp::tmp("depth", total, true);
    let (mut check, recycler, seen) = checker(&img.file);
    // The first delivery blocks until the test has queued the rest, so
    // they all wait in the channel and go to the ring together.
    let (entered_tx, entered) = bounded::<()>(1);
    let (open_tx, gate) = bounded::<()>(1);
    let mut first = true;
    let deliver = move |batch: Batch| {
        if std::mem::take(&mut first) {
            entered_tx.send(()).unwrap();
            gate.recv().unwrap();
        }
        check(batch)
    };
    let reader = DiskReader::start_with(
        &img.file,
        total,
        64,
        32,
        Box::new(deliver),
        DirectMode::Try,
        None,
    )
    .unwrap();
    recycler.set(reader.recycler()).ok().unwrap();
    let batch = |i: u64| (i * 64..(i + 1) * 64).collect::<Vec<u64>>();
    reader.read(1, batch(0)).unwrap();
    entered.recv_timeout(SECS_10).unwrap();
    for i in 1..batches {
        reader.read(1, batch(i)).unwrap();
    }
    open_tx.send(()).unwrap();
    reader.drain(SECS_10).unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), total as usize);
    assert!(
        reader.max_in_flight() >= QUEUE_DEPTH_MIN,
        "only {} reads were in flight at once",
        reader.max_in_flight()
    );
    reader.stop();
}

#[test]
fn writes_land_exactly_and_unwritten_blocks_stay_holes() {
    let total = 512u64;
    let img = Temp::tmp("wr", total, false);
    let writer = DiskWriter::start(&img.file, total, 3, 8, 32).unwrap();
    eprintln!("O_DIRECT on {}: {}", img.path.display(), writer.direct());
    // Scattered single blocks and runs, none past 400: 400..512 stays a hole.
    let written: Vec<u64> = (0..400u64)
        .filter(|b| {
            (b.wrapping_mul(2_654_435_761) >> 7).is_multiple_of(3) || (100..180).contains(b)
        })
        .collect();
    let mut rng = Rng(7);
    let mut rest = &written[..];
    let mut stream = 0u16;
    while !rest.is_empty() {
        let n = (1 + rng.below(64) as usize).min(rest.len());
        let (blocks, tail) = rest.split_at(n);
        rest = tail;
        let mut buf = writer.buffer().unwrap();
        for (i, &b) in blocks.iter().enumerate() {
            buf.block_mut(i).copy_from_slice(&pattern(b));
        }
        stream = stream % 3 + 1;
        writer
            .write(Batch {
                stream,
                blocks: blocks.to_vec(),
                buf,
            })
            .unwrap();
    }
    writer.sync(SECS_10).unwrap();
    assert!(writer.max_in_flight() >= 1);
    let data = data_blocks(&img.file, total);
    let mut got = vec![0u8; BLOCK_BYTES];
    for b in 0..total {
        img.file
            .read_exact_at(&mut got, b * BLOCK_BYTES as u64)
            .unwrap();
        let was_written = written.binary_search(&b).is_ok();
        if was_written {
            assert!(
                got == pattern(b),
                "block {b} does not hold what was written"
            );
        } else {
            assert!(got.iter().all(|&x| x == 0), "block {b} was never written");
        }
        assert_eq!(data[b as usize], was_written, "block {b}: data vs hole");
    }
    writer.stop();
}

#[test]
fn drain_stream_waits_for_its_own_stream_only() {
    // The accounting, deterministically: stream 2 has 4 writes outstanding.
    let shared = Arc::new(Shared::new("disk writer", 3));
    {
        let mut p = shared.lock();
        p.queued[1] = 2;
        p.done[1] = 2;
        p.queued[2] = 5;
        p.done[2] = 1;
    }
    shared.wait(1..2, Duration::ZERO).unwrap();
    let t0 = Instant::now();
    let e = shared.wait(2..3, Duration::from_millis(50)).unwrap_err();
    assert!(e.contains("timed out") && e.contains("4 batches"), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(50));
    let s2 = shared.clone();
    let finisher = std::thread::spawn(move || {
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(5));
            s2.finish(2);
        }
    });
    shared.wait(2..3, SECS_10).unwrap();
    finisher.join().unwrap();

    // And on a real writer: stream 1's barrier returns with its block on disk.
    let total = 64 * 64;
    let img = Temp::tmp("drain", total, false);
    let writer = DiskWriter::start(&img.file, total, 2, 64, 32).unwrap();
    for i in 1..48u64 {
        let mut buf = writer.buffer().unwrap();
        // Every other block: 32 entries per batch.
        let blocks: Vec<u64> = (0..32).map(|k| i * 64 + 2 * k).collect();
        for (j, &b) in blocks.iter().enumerate() {
            buf.block_mut(j).copy_from_slice(&pattern(b));
        }
        writer
            .write(Batch {
                stream: 2,
                blocks,
                buf,
            })
            .unwrap();
    }
    let mut buf = writer.buffer().unwrap();
    buf.block_mut(0).copy_from_slice(&pattern(5));
    writer
        .write(Batch {
            stream: 1,
            blocks: vec![5],
            buf,
        })
        .unwrap();
    writer.drain_stream(1, SECS_10).unwrap();
    let mut got = vec![0u8; BLOCK_BYTES];
    img.file
        .read_exact_at(&mut got, 5 * BLOCK_BYTES as u64)
        .unwrap();
    assert!(got == pattern(5));
    writer.drain_stream(2, SECS_10).unwrap();
    assert!(writer.drain_stream(0, SECS_10).is_err());
    assert!(writer.drain_stream(3, SECS_10).is_err());
    writer.stop();
}

#[test]
fn bad_batches_and_parameters_are_refused() {
    let total = 16;
    let img = Temp::tmp("bad", total, true);
    let (reader, _) = checking_reader(&img.file, total, 4, 32, DirectMode::Try);
    for blocks in [
        vec![],
        vec![3, 1],
        vec![2, 2],
        vec![total],
        vec![1, u64::MAX],
        (0..65).collect(),
    ] {
        assert!(reader.read(1, blocks.clone()).is_err(), "{blocks:?}");
    }
    reader.drain(SECS_10).unwrap();
    reader.stop();

    // One buffer: a refused write must hand it back, or buffer() would hang.
    let writer = DiskWriter::start(&img.file, total, 2, 1, 32).unwrap();
    for (stream, blocks) in [
        (0, vec![1]),
        (3, vec![1]),
        (1, vec![5, 4]),
        (1, vec![total]),
    ] {
        let buf = writer.buffer().unwrap();
        let e = writer
            .write(Batch {
                stream,
                blocks,
                buf,
            })
            .unwrap_err();
        assert!(e.starts_with("disk write for stream"), "{e}");
    }
    let other = DiskWriter::start(&img.file, total, 1, 1, 32).unwrap();
    let foreign = other.buffer().unwrap();
    assert!(writer
        .write(Batch {
            stream: 1,
            blocks: vec![1],
            buf: foreign,
        })
        .is_err());
    other.stop();
    writer.buffer().unwrap();
    writer.stop();

    let start = |blocks, buffers, depth| {
        DiskReader::start(&img.file, blocks, buffers, depth, |_| Ok(())).map(|_| ())
    };
    let kind = |r: io::Result<()>| r.unwrap_err().kind();
    assert_eq!(
        kind(start(total, 4, QUEUE_DEPTH_MIN - 1)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(start(total, 4, QUEUE_DEPTH_MAX + 1)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(kind(start(total, 0, 32)), io::ErrorKind::InvalidInput);
    assert_eq!(
        kind(start(total, BUFFERS_MAX + 1, 32)),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(kind(start(total + 1, 4, 32)), io::ErrorKind::InvalidInput);
    assert_eq!(kind(start(u64::MAX, 4, 32)), io::ErrorKind::InvalidInput);
    let w = DiskWriter::start(&img.file, total, 0, 4, 32).map(|_| ());
    assert_eq!(kind(w), io::ErrorKind::InvalidInput);
}

#[test]
fn a_failing_deliver_stops_the_reader_without_hanging() {
    let total = 16;
    let img = Temp::tmp("deliver", total, true);
    // Two buffers, and the callback drops each: nothing comes back.
    let reader = DiskReader::start(
        &img.file,
        total,
        2,
        32,
        |_| Err("consumer gone".to_string()),
    )
    .unwrap();
    reader.read(1, vec![0, 1]).unwrap();
    assert_eq!(reader.drain(SECS_10).unwrap_err(), "consumer gone");
    for _ in 0..3 {
        assert_eq!(reader.read(1, vec![2]).unwrap_err(), "consumer gone");
    }
    assert_eq!(reader.drain(SECS_10).unwrap_err(), "consumer gone");
    reader.stop();
}

#[test]
fn a_failed_read_names_the_block_and_errno() {
    // A directory opens fine and fails every read with EISDIR.
    let dir = std::env::temp_dir().join(format!("ferry-uring-{}-dir", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = File::open(&dir).unwrap();
    let blocks = f.metadata().unwrap().len() / BLOCK_BYTES as u64;
    if blocks == 0 {
        eprintln!("skipped: this file system gives directories no size");
        let _ = std::fs::remove_dir(&dir);
        return;
    }
    let reader = DiskReader::start(&f, blocks, 2, 32, |_| Ok(())).unwrap();
    reader.read(3, vec![0]).unwrap();
    let e = reader.drain(SECS_10).unwrap_err();
    assert!(e.contains("read of block 0 (stream 3)"), "{e}");
    assert!(e.contains(&format!("os error {}", libc::EISDIR)), "{e}");
    assert_eq!(reader.read(3, vec![0]).unwrap_err(), e);
    reader.stop();
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn a_short_read_at_the_end_of_the_file_is_an_error() {
    let img = Temp::tmp("eof", 8, true);
    let reader = DiskReader::start(&img.file, 8, 2, 32, |_| Ok(())).unwrap();
    // The image shrinks under the reader: blocks 4.. are gone.
    img.file.set_len(4 * BLOCK_BYTES as u64).unwrap();
    reader.read(1, vec![2, 3, 4, 5]).unwrap();
    let e = reader.drain(SECS_10).unwrap_err();
    assert!(
        e.contains("block 4") && e.contains("end of the file"),
        "{e}"
    );
    reader.stop();
}

#[test]
fn buffered_fallback_works_on_tmpfs() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let total = 256;
    let img = Temp::new(shm, "shm", total, true);
    let mut rng = Rng(99);
    // Linux >= 6.6 tmpfs takes O_DIRECT; older ones refuse it (EINVAL).
    // Refused simulates that refusal, so the fallback runs on any kernel.
    for mode in [DirectMode::Try, DirectMode::Refused] {
        let (reader, seen) = checking_reader(&img.file, total, 8, 32, mode);
        eprintln!("tmpfs, {mode:?}: O_DIRECT {}", reader.direct());
        if mode == DirectMode::Refused {
            assert!(!reader.direct());
        }
        let mut want = 0;
        for _ in 0..50 {
            let batch = random_batch(&mut rng, total);
            want += batch.len();
            reader.read(1, batch).unwrap();
        }
        reader.drain(SECS_10).unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), want);
        reader.stop();
    }
    let out = Temp::new(shm, "shm-wr", 64, false);
    let writer =
        DiskWriter::start_with(&out.file, 64, 1, 4, 32, DirectMode::Refused, None).unwrap();
    assert!(!writer.direct());
    let mut buf = writer.buffer().unwrap();
    for i in 0..3 {
        buf.block_mut(i).copy_from_slice(&pattern(10 + i as u64));
    }
    writer
        .write(Batch {
            stream: 1,
            blocks: vec![10, 11, 12],
            buf,
        })
        .unwrap();
    writer.sync(SECS_10).unwrap();
    let mut got = vec![0u8; BLOCK_BYTES];
    for b in 10..13 {
        out.file
            .read_exact_at(&mut got, b * BLOCK_BYTES as u64)
            .unwrap();
        assert!(got == pattern(b), "block {b}");
    }
    writer.stop();
}

#[test]
fn stop_with_io_outstanding_returns() {
    let total = 64 * 64u64;
    let img = Temp::tmp("stop", total, false);
    let writer = DiskWriter::start(&img.file, total, 1, 64, 32).unwrap();
    for i in 0..64u64 {
        let buf = writer.buffer().unwrap();
        // Every other block: 32 entries a batch, 2048 in all.
        let blocks = (0..32).map(|k| i * 64 + 2 * k).collect();
        writer
            .write(Batch {
                stream: 1,
                blocks,
                buf,
            })
            .unwrap();
    }
    let t0 = Instant::now();
    writer.stop();
    assert!(t0.elapsed() < JOIN_WAIT, "stop took {:?}", t0.elapsed());

    let (reader, _) = checking_reader(&img.file, total, 64, 32, DirectMode::Try);
    for i in 0..64u64 {
        reader
            .read(1, (0..32).map(|k| i * 64 + 2 * k).collect())
            .unwrap();
    }
    let t0 = Instant::now();
    reader.stop();
    assert!(t0.elapsed() < JOIN_WAIT, "stop took {:?}", t0.elapsed());
}

/// A migration's forced placement reaches the ring thread: with
/// `cpus:<one CPU>` the writer's thread may run on that CPU only.
#[test]
fn a_forced_placement_pins_the_ring_thread() {
    use crate::numa::{Facts, Placement, PlacementPolicy, Side, Stage, Topology};
    let Ok(topo) = Topology::read(std::path::Path::new("/sys")) else {
        eprintln!("skipped: no NUMA topology in /sys");
        return;
    };
    let cpu = crate::numa::current_affinity()
        .ok()
        .and_then(|c| c.as_slice().last().copied())
        .unwrap_or(0);
    let policy: PlacementPolicy = format!("cpus:{cpu}").parse().unwrap();
    let facts = Facts {
        disk: Some(crate::numa::probe::Device {
            name: "test image".into(),
            node: None,
        }),
        ..Facts::default()
    };
    let plan = Placement::plan(&topo, &policy, Side::Target, &facts).unwrap();
    let out = Temp::new(&std::env::temp_dir(), "pinned", 64, false);
    let writer =
        DiskWriter::start_pinned(&out.file, 64, 1, 4, 32, plan.pinner(Stage::DiskWrite)).unwrap();
    // The thread pins itself first thing; give it a moment to start. Other
    // tests' writers (unpinned) may run meanwhile under the same name.
    let want = cpu.to_string();
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = thread_cpus("ferry-disk-wr");
        if seen.contains(&want) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.stop();
    assert!(
        seen.contains(&want),
        "want a writer on CPU {want}, saw {seen:?}"
    );
}

/// `Cpus_allowed_list` of each of this process's threads called `name`.
fn thread_cpus(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(v) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            out.push(v.trim().to_string());
        }
    }
    out
}
