//! `ferry keygen`: a fresh pre-shared key, to stdout or to a 0600 file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use ferry_engine::Key;

use super::{Fail, EXIT_USAGE};

/// Makes a key; writes `<64 hex digits>\n` to `out` (mode 0600, refusing to
/// replace a file unless `force`) or to stdout.
pub fn run(out: Option<&Path>, force: bool) -> Result<u8, Fail> {
    let key = Key::generate().context("cannot make a key")?;
    let text = format!("{}\n", key.to_hex());
    let Some(path) = out else {
        print!("{text}");
        return Ok(0);
    };
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(Fail::new(
            EXIT_USAGE,
            format!("{} exists; pass --force to replace it", path.display()),
        ));
    }
    // Write a temporary file next to it and rename it over: the key is never
    // readable by others, not even when replacing a file with a laxer mode.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        crate::util::random_hex(4)
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(anyhow::Error::new(e)
            .context(format!("cannot write {}", path.display()))
            .into());
    }
    eprintln!("wrote a new key to {}", path.display());
    Ok(0)
}
