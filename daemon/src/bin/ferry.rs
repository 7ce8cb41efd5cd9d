//! `ferry`: the command line of the local ferryd (see docs/cli.md).

fn main() -> std::process::ExitCode {
    ferry_daemon::cli::main()
}
