//! Why tests failed, from nextest's JUnit report.
//!
//! A failing integration test's panic message often carries a daemon's
//! whole log, and CI keeps only part of a long run's output. After a
//! failed run `cargo xtask ci` prints, last, each failing test's name and
//! the lines of its panic (the start and the end of a long one), read from
//! `target/nextest/default/junit.xml` (configured in `.config/nextest.toml`).

use std::fmt::Write as _;
use std::path::Path;

/// Lines shown from the start of a long panic message.
const HEAD: usize = 12;
/// Lines shown from its end (where a log dump ends in what happened last).
const TAIL: usize = 25;
/// A line longer than this is cut.
const LINE_MAX: usize = 400;

/// One failing test.
#[derive(Debug, PartialEq)]
pub struct Failure {
    /// `binary::test`, as nextest names it.
    pub name: String,
    /// The lines that say why.
    pub why: Vec<String>,
}

/// The failures in the JUnit report at `path`, or why it cannot be read.
pub fn failures(path: &Path) -> Result<Vec<Failure>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The failures in a JUnit report's text.
pub fn parse(xml: &str) -> Result<Vec<Failure>, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for case in doc.descendants().filter(|n| n.has_tag_name("testcase")) {
        let Some(failure) = case
            .children()
            .find(|n| n.has_tag_name("failure") || n.has_tag_name("error"))
        else {
            continue;
        };
        let name = match case.attribute("classname") {
            Some(class) => format!("{class} {}", case.attribute("name").unwrap_or("?")),
            None => case.attribute("name").unwrap_or("?").to_string(),
        };
        let child_text = |tag: &str| {
            case.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .unwrap_or("")
                .to_string()
        };
        let output = format!("{}\n{}", child_text("system-out"), child_text("system-err"));
        let mut why = Vec::new();
        if let Some(kind) = failure.attribute("type") {
            why.push(format!("({kind})"));
        }
        why.extend(panic_lines(&output).unwrap_or_else(|| {
            // No panic (a timeout, a signal): the message, then the end of
            // the output.
            let mut lines: Vec<String> = failure
                .attribute("message")
                .into_iter()
                .map(String::from)
                .collect();
            lines.extend(last_lines(&output, TAIL));
            lines
        }));
        out.push(Failure {
            name,
            why: why.into_iter().map(|l| cut(&l)).collect(),
        });
    }
    Ok(out)
}

/// Every panic in `output`: from its `panicked at` line to the `note: run
/// with RUST_BACKTRACE` or `stack backtrace:` line (or the next panic, or
/// the end), a long one
/// shortened to its first [`HEAD`] and last [`TAIL`] lines.
fn panic_lines(output: &str) -> Option<Vec<String>> {
    let lines: Vec<&str> = output.lines().collect();
    let starts: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].contains("panicked at"))
        .collect();
    if starts.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        let next = starts.get(k + 1).copied().unwrap_or(lines.len());
        let end = (start..next)
            .find(|&i| {
                lines[i].starts_with("note: run with `RUST_BACKTRACE")
                    || lines[i] == "stack backtrace:"
            })
            .unwrap_or(next);
        let panic = &lines[start..end];
        if panic.len() <= HEAD + TAIL {
            out.extend(panic.iter().map(|l| l.to_string()));
        } else {
            out.extend(panic[..HEAD].iter().map(|l| l.to_string()));
            out.push(format!("[... {} lines ...]", panic.len() - HEAD - TAIL));
            out.extend(panic[panic.len() - TAIL..].iter().map(|l| l.to_string()));
        }
    }
    Some(out)
}

fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

fn cut(line: &str) -> String {
    if line.chars().count() <= LINE_MAX {
        return line.to_string();
    }
    let kept: String = line.chars().take(LINE_MAX).collect();
    format!("{kept} [...]")
}

/// The failures as text for the end of a CI log.
pub fn render(failures: &[Failure]) -> String {
    let mut s = String::new();
    for f in failures {
        let _ = writeln!(s, "--- {} ---", f.name);
        for l in &f.why {
            let _ = writeln!(s, "    {l}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="3" failures="2" errors="0">
  <testsuite name="ferry-daemon::faults" tests="3" failures="2">
    <testcase name="passes" classname="ferry-daemon::faults" time="1.0"/>
    <testcase name="panics" classname="ferry-daemon::faults" time="16.3">
      <failure type="test failure">thread 'panics' panicked</failure>
      <system-out>running 1 test</system-out>
      <system-err>starting
thread 'panics' panicked at daemon/tests/faults.rs:870:5:
vm never registered again:
LOG1
LOG2
stack backtrace:
   0: __rustc::rust_begin_unwind
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace
</system-err>
    </testcase>
    <testcase name="hangs" classname="ferry-engine::migrate" time="600">
      <failure type="test timeout" message="test timed out"/>
      <system-err>seed 17 has run for 60 s: hung?</system-err>
    </testcase>
  </testsuite>
</testsuites>"#;

    #[test]
    fn finds_the_panic_and_the_timeout() {
        let f = parse(REPORT).expect("parses");
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].name, "ferry-daemon::faults panics");
        assert_eq!(
            f[0].why,
            [
                "(test failure)",
                "thread 'panics' panicked at daemon/tests/faults.rs:870:5:",
                "vm never registered again:",
                "LOG1",
                "LOG2",
            ]
        );
        assert_eq!(f[1].name, "ferry-engine::migrate hangs");
        assert_eq!(
            f[1].why,
            [
                "(test timeout)",
                "test timed out",
                "seed 17 has run for 60 s: hung?"
            ]
        );
        let text = render(&f);
        assert!(
            text.contains("--- ferry-daemon::faults panics ---\n"),
            "{text}"
        );
    }

    #[test]
    fn a_long_panic_keeps_its_start_and_end() {
        let mut err = String::from("thread 't' panicked at x.rs:1:1:\nwhy\n");
        for i in 0..100 {
            err.push_str(&format!("log line {i}\n"));
        }
        let lines = panic_lines(&err).expect("a panic");
        assert_eq!(lines.len(), HEAD + 1 + TAIL);
        assert_eq!(lines[1], "why");
        assert_eq!(
            lines[HEAD],
            format!("[... {} lines ...]", 102 - HEAD - TAIL)
        );
        assert_eq!(lines.last().map(String::as_str), Some("log line 99"));
    }

    #[test]
    fn a_bad_report_is_an_error() {
        assert!(parse("<testsuites><testcase").is_err());
        assert_eq!(parse("<testsuites/>"), Ok(Vec::new()));
        let long = "x".repeat(1000);
        assert!(cut(&long).ends_with(" [...]"));
        assert_eq!(cut(&long).chars().count(), LINE_MAX + 6);
    }
}
