//! The `liqo-lab` command: up (detached), status, down.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn liqo_lab(state: &Path, args: &[&str]) -> std::io::Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_liqo-lab"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `liqo-lab down` when the test ends, whatever happened: detached labs outlive the test.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = liqo_lab(&self.0, &["down"]);
    }
}

#[test]
fn up_status_down() -> TestResult {
    let state = std::env::temp_dir().join(format!("liqo-lab-cli-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());

    let status = liqo_lab(&state, &["status"])?;
    assert_eq!(status.status.code(), Some(1));
    assert!(text(&status.stdout).contains("no lab is up"));

    let up = liqo_lab(
        &state,
        &[
            "up",
            "--clusters",
            "2",
            "--workers",
            "1",
            "--name-prefix",
            "cli",
        ],
    )?;
    let out = text(&up.stdout);
    assert!(
        up.status.success(),
        "up failed: {}\n{}",
        out,
        text(&up.stderr)
    );
    let export = out
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .ok_or("no export line")?;
    let paths: Vec<&str> = export.split(':').collect();
    assert_eq!(paths.len(), 2, "{export}");
    assert!(paths.iter().all(|p| Path::new(p).exists()));
    assert!(out.contains("cli-1: https://127.0.0.1:") && out.contains("cli-2: https://127.0.0.1:"));

    // The processes outlived `up`.
    let status = liqo_lab(&state, &["status"])?;
    let table = text(&status.stdout);
    assert!(status.status.success(), "{table}\n{}", text(&status.stderr));
    for name in ["cli-1", "cli-2"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or(format!("no row for {name}: {table}"))?;
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2..5], ["yes", "1", "4/4"], "{row}");
    }

    let again = liqo_lab(&state, &["up", "--clusters", "1"])?;
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already up"),
        "{}",
        text(&again.stderr)
    );

    let down = liqo_lab(&state, &["down"])?;
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        text(&down.stdout).contains("stopped 9 process(es)"),
        "{}",
        text(&down.stdout)
    );
    assert!(!state.exists());

    let down = liqo_lab(&state, &["down"])?;
    assert!(down.status.success());
    assert!(text(&down.stdout).contains("no lab is up"));
    Ok(())
}
