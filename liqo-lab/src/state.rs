//! The lab's state file, `<root>/lab.json`, and stopping a lab from it ([`down`]).

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};

use crate::{
    cluster::write_file,
    dataplane::{DAEMON_STOP_GRACE, DataPlaneRecord, remove_netns_of},
    error::{LabError, Result},
    ports::release_file,
    process::{STOP_GRACE, terminate_pid},
    procfs::{ProcessToken, argv0},
    spec::Lifetime,
};

/// Name of the state file in a lab's root directory.
pub const STATE_FILE: &str = "lab.json";
const FORMAT: u32 = 1;

/// What `lab.json` records about a lab, for `liqo-lab status` / `down` and for debugging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LabState {
    /// Format version of the file.
    pub format: u32,
    /// The lab's root directory.
    pub root: PathBuf,
    /// Whether the processes die with the process that started them.
    pub lifetime: Lifetime,
    /// The directory of the binaries.
    pub binaries: PathBuf,
    /// The shared etcd's client URL.
    pub etcd_url: String,
    /// The shared etcd.
    pub etcd: ProcessRecord,
    /// The clusters.
    pub clusters: Vec<ClusterRecord>,
    /// The port reservation files held by the lab.
    pub port_reservations: Vec<PathBuf>,
    /// The owner token written in those files.
    pub reservation_token: String,
    /// The data plane's background process and gateways (`liqo-lab up --dataplane`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<DataPlaneRecord>,
}

/// One cluster in [`LabState`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClusterRecord {
    /// The cluster's name.
    pub name: String,
    /// The API server URL.
    pub api_url: String,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The pod CIDR.
    pub pod_cidr: String,
    /// The service CIDR.
    pub service_cidr: String,
    /// The directory of the component logs.
    pub log_dir: PathBuf,
    /// The components.
    pub components: Vec<ProcessRecord>,
}

/// One process in [`LabState`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProcessRecord {
    /// The component's name, e.g. `kube-apiserver`.
    pub component: String,
    /// Its binary.
    pub binary: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// The process, when running.
    pub process: Option<ProcessToken>,
}

impl ProcessRecord {
    /// Whether the recorded process still runs (same pid and start time, same binary), so that a
    /// recycled pid is never signalled.
    pub fn is_running(&self) -> bool {
        self.process.is_some_and(|t| {
            t.is_alive() && argv0(t.pid).is_some_and(|a| Path::new(&a) == self.binary.as_path())
        })
    }
}

impl LabState {
    /// The state file of the lab rooted at `root`.
    pub fn path(root: &Path) -> PathBuf {
        root.join(STATE_FILE)
    }

    /// Reads the state of the lab rooted at `root`; `None` if there is no state file.
    pub fn load(root: &Path) -> Result<Option<Self>> {
        let path = Self::path(root);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LabError::io("reading", &path, e)),
        };
        let state: Self = serde_json::from_str(&text).map_err(|e| LabError::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.format != FORMAT {
            return Err(LabError::State {
                path,
                message: format!("unknown format {} (expected {FORMAT})", state.format),
            });
        }
        Ok(Some(state))
    }

    /// Writes the state to `<root>/lab.json` (atomically).
    pub fn save(&self) -> Result<()> {
        let path = Self::path(&self.root);
        let text = serde_json::to_string_pretty(self).map_err(|e| LabError::State {
            path: path.clone(),
            message: format!("serializing: {e}"),
        })?;
        write_file(&path, &text, 0o644)
    }

    /// Every recorded process that still runs, with its owner (`etcd`, `dataplane` or the
    /// cluster's name).
    pub fn running_processes(&self) -> Vec<(&str, &ProcessRecord)> {
        self.dataplane
            .iter()
            .map(|d| ("dataplane", &d.process))
            .chain(std::iter::once(("etcd", &self.etcd)))
            .chain(
                self.clusters
                    .iter()
                    .flat_map(|c| c.components.iter().map(move |p| (c.name.as_str(), p))),
            )
            .filter(|(_, p)| p.is_running())
            .collect()
    }

    pub(crate) fn new_file(root: &Path, state: Self) -> Result<StateFile> {
        let file = StateFile {
            path: Self::path(root),
            state: Mutex::new(state),
        };
        file.update(|_| {})?;
        Ok(file)
    }
}

/// The in-memory copy of `lab.json`, rewritten on every change.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    state: Mutex<LabState>,
}

impl StateFile {
    pub(crate) fn update(&self, f: impl FnOnce(&mut LabState)) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut state);
        let text = serde_json::to_string_pretty(&*state).map_err(|e| LabError::State {
            path: self.path.clone(),
            message: format!("serializing: {e}"),
        })?;
        if !self.path.parent().is_some_and(Path::exists) {
            // The lab was removed meanwhile; nothing to record.
            return Ok(());
        }
        write_file(&self.path, &text, 0o644)
    }
}

/// What [`down`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownOutcome {
    /// There was no lab state in the directory.
    NothingUp,
    /// The lab was stopped and its directory removed.
    Stopped {
        /// How many processes were still running and got stopped.
        processes: usize,
    },
}

/// Stops the lab rooted at `root` from its state file (any lifetime; this is `liqo-lab down`):
/// the data plane's process first, then its leftover network namespaces, then
/// SIGTERM then SIGKILL to each recorded process that still runs (checked by pid, start time and
/// binary), then removes the port reservations and the root directory. Idempotent.
pub async fn down(root: &Path) -> Result<DownOutcome> {
    let Some(state) = LabState::load(root)? else {
        return Ok(DownOutcome::NothingUp);
    };
    let running = state.running_processes();
    let count = running.len();
    // The data plane first (it removes its namespaces on SIGTERM), etcd last.
    let (dataplane, rest): (Vec<_>, Vec<_>) = running
        .into_iter()
        .partition(|(owner, _)| *owner == "dataplane");
    for (_, p) in &dataplane {
        if let Some(t) = p.process {
            terminate_pid(t.pid, DAEMON_STOP_GRACE)
                .await
                .map_err(|source| LabError::Stop {
                    owner: "the lab".to_owned(),
                    component: p.component.clone(),
                    pid: t.pid,
                    source,
                })?;
        }
    }
    if let Some(dp) = &state.dataplane {
        // Whatever a killed data plane left behind.
        remove_netns_of(&dp.id)?;
    }
    let (etcd, components): (Vec<_>, Vec<_>) =
        rest.into_iter().partition(|(owner, _)| *owner == "etcd");
    for group in [components, etcd] {
        let stops = group.iter().map(|(owner, p)| async move {
            let Some(t) = p.process else { return Ok(()) };
            terminate_pid(t.pid, STOP_GRACE)
                .await
                .map_err(|source| LabError::Stop {
                    owner: (*owner).to_owned(),
                    component: p.component.clone(),
                    pid: t.pid,
                    source,
                })
        });
        for r in futures::future::join_all(stops).await {
            r?;
        }
    }
    for f in &state.port_reservations {
        release_file(f, &state.reservation_token);
    }
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(LabError::io("removing the lab directory", root, e)),
    }
    Ok(DownOutcome::Stopped { processes: count })
}
