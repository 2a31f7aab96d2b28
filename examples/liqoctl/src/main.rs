//! `liqoctl`: the liqo-rs reference CLI. See `docs/cli.md`.
fn main() -> std::process::ExitCode {
    liqoctl::main()
}
