//! `liqoctl`, the reference CLI of liqo-rs, also installed as the kubectl plugin `kubectl-liqo`.
//!
//! It is a thin client over Kubernetes objects: it declares intent (a `ForeignCluster`'s role, a
//! `NamespaceOffloading`) with server-side apply under the field manager `liqoctl`, then watches
//! until the agents converge. It never runs a handshake itself. The reference is `docs/cli.md`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod cli;
mod commands;
mod error;
mod kube_util;
mod output;
mod progress;

use std::{ffi::OsString, process::ExitCode};

pub use error::CliError;

/// The field manager of every object liqoctl applies.
pub const FIELD_MANAGER: &str = "liqoctl";

/// Runs the CLI with the process arguments and returns its exit code: 0 on success, 1 when a
/// command failed, 2 on a usage error.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    ExitCode::from(run(args))
}

/// Runs the CLI with `args` (`args[0]` is the program name: one ending in `kubectl-liqo` makes
/// help and usage say `kubectl liqo`) and returns the exit code.
pub fn run(args: Vec<OsString>) -> u8 {
    let plugin = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.trim_end_matches(".exe").ends_with("kubectl-liqo"));
    let parsed = match cli::command(plugin).try_get_matches_from(args) {
        Ok(m) => {
            use clap::FromArgMatches;
            cli::Cli::from_arg_matches(&m)
        }
        Err(e) => Err(e),
    };
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            // Help and --version print to stdout and exit 0; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(commands::dispatch(cli)) {
        Ok(()) => 0,
        Err(e) => {
            e.print();
            e.exit_code()
        }
    }
}
