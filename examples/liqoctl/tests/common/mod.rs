//! Shared by the liqoctl tests: running the CLI against a lab cluster, and small helpers.
#![allow(dead_code)] // Each test binary uses what it needs.

use std::{process::Output, time::Duration};

use liqo_core::ClusterId;
use liqo_lab::{Cluster, Lab};

/// The cluster `name` of `lab`.
pub fn cluster<'a>(lab: &'a Lab, name: &str) -> &'a Cluster {
    lab.cluster(name)
        .unwrap_or_else(|| panic!("cluster {name} missing"))
}

/// A cluster id from a test literal.
pub fn id(s: &str) -> ClusterId {
    s.parse().expect("valid test cluster id")
}

/// What a CLI run did.
pub struct Run {
    /// Its exit code (-1 when killed by a signal).
    pub code: i32,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `bin` with `args` against `cluster` (its admin kubeconfig).
pub async fn run_bin(bin: &str, cluster: Option<&Cluster>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(bin);
    if let Some(c) = cluster {
        cmd.arg("--kubeconfig").arg(c.kubeconfig_path());
    }
    cmd.args(args).env_remove("KUBECONFIG");
    let out: Output = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{bin} did not finish within 180s"))
        .unwrap_or_else(|e| panic!("{bin} does not run: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs liqoctl with `args` against `cluster` (its admin kubeconfig).
pub async fn liqoctl(cluster: &Cluster, args: &[&str]) -> Run {
    run_bin(env!("CARGO_BIN_EXE_liqoctl"), Some(cluster), args).await
}
