//! `kubectl-liqo`: the same CLI as `liqoctl`, found by kubectl as the plugin `kubectl liqo`.
fn main() -> std::process::ExitCode {
    liqoctl::main()
}
