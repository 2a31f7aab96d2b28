//! The data plane of a detached lab, run by a background process (`liqo-lab up --dataplane`).

use std::{
    ffi::OsString,
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{DataPlane, Gateway, dataplane_id};
use crate::{
    error::{LabError, Result},
    process::{tail_lines, terminate_pid},
    procfs::ProcessToken,
    state::{LabState, ProcessRecord},
};

/// How long [`start_daemon`] waits for the data plane to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `down` gives the daemon to remove its namespaces before killing it.
pub(crate) const DAEMON_STOP_GRACE: Duration = Duration::from_secs(20);
/// Name of the daemon's log in the lab's root directory.
const LOG: &str = "dataplane.log";

/// The data plane of a detached lab, as recorded in its state file ([`LabState::dataplane`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DataPlaneRecord {
    /// The data plane's id (see [`dataplane_id`]).
    pub id: String,
    /// The background process running it (its log is `<root>/dataplane.log`).
    pub process: ProcessRecord,
    /// Every cluster's gateway; empty until the data plane is ready.
    pub gateways: Vec<Gateway>,
}

/// Starts the data plane of the detached lab rooted at `root` in a background process and returns
/// once it is ready.
///
/// `program` and `args` make the command that runs [`run_daemon`] for `root` (the CLI passes
/// itself with its hidden `dataplane-daemon` subcommand). The process runs in its own process
/// group, logs to `<root>/dataplane.log` and is recorded in the lab's state file, so
/// [`down`](crate::down) stops it and removes its namespaces. If it fails to start, it is stopped
/// and the error carries the end of its log.
pub async fn start_daemon(
    root: &Path,
    program: &Path,
    args: &[OsString],
) -> Result<DataPlaneRecord> {
    let state_path = LabState::path(root);
    let Some(mut state) = LabState::load(root)? else {
        return Err(LabError::State {
            path: state_path,
            message: "no lab is up here".to_owned(),
        });
    };
    if let Some(dp) = &state.dataplane
        && dp.process.is_running()
    {
        return Err(LabError::DataPlane(format!(
            "the lab's data plane already runs (pid {})",
            dp.process.process.map(|t| t.pid).unwrap_or_default()
        )));
    }
    let log = root.join(LOG);
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| LabError::io("opening the log", &log, e))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| LabError::Spawn {
            owner: "the lab".to_owned(),
            component: "data plane".to_owned(),
            binary: program.to_owned(),
            log: log.clone(),
            source: e,
        })?;
    let pid = child.id().unwrap_or_default();
    let mut record = DataPlaneRecord {
        id: dataplane_id(&state.root),
        process: ProcessRecord {
            component: "dataplane".to_owned(),
            binary: program.to_owned(),
            log: log.clone(),
            process: ProcessToken::of(pid),
        },
        gateways: Vec::new(),
    };
    // Recorded at once, so that `down` stops it even if this process is interrupted now.
    state.dataplane = Some(record.clone());
    state.save()?;

    let fail = |reason: String| failed(pid, dataplane_id(&state.root), log.clone(), reason);
    let Some(stdout) = child.stdout.take() else {
        return Err(fail("has no standard output".to_owned()).await);
    };
    let mut line = String::new();
    let read =
        tokio::time::timeout(READY_TIMEOUT, BufReader::new(stdout).read_line(&mut line)).await;
    let gateways: Vec<Gateway> = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str(line.trim()) {
            Ok(g) => g,
            Err(e) => {
                return Err(fail(format!("announced something else than its gateways: {e}")).await);
            }
        },
        Ok(Ok(_)) => return Err(fail("exited before it was ready".to_owned()).await),
        Ok(Err(e)) => return Err(fail(format!("could not be read: {e}")).await),
        Err(_) => return Err(fail(format!("was not ready within {READY_TIMEOUT:?}")).await),
    };
    record.gateways = gateways;
    state.dataplane = Some(record.clone());
    state.save()?;
    Ok(record)
}

/// Stops a daemon that failed to start and removes what it made; the error says why.
async fn failed(pid: u32, id: String, log: PathBuf, reason: String) -> LabError {
    let _ = terminate_pid(pid, DAEMON_STOP_GRACE).await;
    let _ = tokio::task::spawn_blocking(move || super::remove_netns_of(&id)).await;
    LabError::DataPlane(format!(
        "the data-plane process (pid {pid}) {reason}; log {}, last lines:\n{}",
        log.display(),
        tail_lines(&log, 20)
    ))
}

/// Runs the data plane of the lab rooted at `root` until SIGTERM or SIGINT, then removes it.
///
/// This is the background process of [`start_daemon`]: once ready it prints its gateways as one
/// JSON line on standard output and writes nothing there afterwards.
pub async fn run_daemon(root: &Path) -> Result<()> {
    let Some(state) = LabState::load(root)? else {
        return Err(LabError::State {
            path: LabState::path(root),
            message: "no lab is up here".to_owned(),
        });
    };
    let signal = |kind| {
        tokio::signal::unix::signal(kind)
            .map_err(|e| LabError::DataPlane(format!("installing a signal handler: {e}")))
    };
    let mut term = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let dp = DataPlane::start_from_state(&state).await?;
    let line = serde_json::to_string(dp.gateways())
        .map_err(|e| LabError::DataPlane(format!("serializing the gateways: {e}")))?;
    let announced = (|| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    })();
    if let Err(e) = announced {
        tracing::warn!("announcing readiness on standard output: {e}");
    }
    tracing::info!(root = %root.display(), "data plane running; SIGTERM stops it");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping the data plane");
    dp.stop().await
}
