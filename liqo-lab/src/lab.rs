//! A running lab: one shared etcd and N clusters.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

use crate::{
    binaries::{Binaries, locate_binaries},
    cluster::{Cluster, ClusterSetup, Component},
    error::{LabError, Result},
    nodes::{RealNodeInfo, RealNodes},
    ports::{PortRegistry, PortReservation},
    process::{CommandSpec, STOP_GRACE, Supervised, Watchdog},
    procfs::ProcessToken,
    spec::{LabSpec, Lifetime},
    state::{ClusterRecord, LabState, ProcessRecord, StateFile},
};

const ETCD_OWNER: &str = "the lab";

/// A running process of a lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The cluster it belongs to; `None` for the shared etcd.
    pub cluster: Option<String>,
    /// The component's program name, e.g. `kube-apiserver` or `etcd`.
    pub component: String,
    /// Its pid.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
}

/// A running lab: one etcd shared by every cluster (each under its own `--etcd-prefix`) and, per
/// cluster, kube-apiserver, kube-controller-manager, kube-scheduler and kwok.
///
/// Dropping an [attached](Lifetime::Attached) lab kills its processes and removes its directory;
/// [`stop`](Lab::stop) does the same gracefully. Dropping a [detached](Lifetime::Detached) lab
/// leaves it running.
#[derive(Debug)]
pub struct Lab {
    root: PathBuf,
    lifetime: Lifetime,
    binaries: Binaries,
    etcd: Supervised,
    etcd_url: String,
    clusters: Vec<Cluster>,
    nodes: Option<RealNodes>,
    ports: Vec<PortReservation>,
    watchdog: Option<Watchdog>,
    state: Option<Arc<StateFile>>,
    startup: Duration,
    /// Nothing left to clean up (the lab was stopped).
    released: bool,
    /// A detached lab that started: dropping the handle leaves it running.
    handed_over: bool,
}

impl Lab {
    /// Starts a lab: etcd first, then every cluster concurrently. Returns once each API server
    /// answers `/readyz`, each `default` namespace has its `default` service account, and every
    /// worker node is Ready and schedulable. On failure everything started so far is stopped and
    /// removed, and the error names the component, its log and the log's last lines.
    pub async fn start(spec: LabSpec) -> Result<Lab> {
        spec.validate()?;
        let started = Instant::now();
        let binaries = locate_binaries(spec.binaries.as_deref()).await?;
        let root = prepare_root(spec.root.as_deref())?;
        let me = ProcessToken::current();
        let ports = match PortRegistry::system().reserve_many(2 + spec.clusters.len(), me) {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_dir_all(&root);
                return Err(e);
            }
        };
        let etcd_dir = root.join("etcd");
        let etcd_client_port = ports[0].port();
        let etcd_peer_port = ports[1].port();
        let etcd_url = format!("http://127.0.0.1:{etcd_client_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd = Supervised::new(CommandSpec {
            owner: ETCD_OWNER.to_owned(),
            component: "etcd".to_owned(),
            binary: binaries.etcd.clone(),
            args: [
                "--name=default".to_owned(),
                format!("--data-dir={}", etcd_dir.join("data").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true".to_owned(),
            ]
            .into_iter()
            .map(OsString::from)
            .collect(),
            log: etcd_dir.join("etcd.log"),
            workdir: etcd_dir.clone(),
        });
        // From here on, dropping `lab` (on any error) kills what runs and removes the directory.
        let mut lab = Lab {
            root,
            lifetime: spec.lifetime,
            binaries,
            etcd,
            etcd_url,
            clusters: Vec::new(),
            nodes: None,
            ports,
            watchdog: None,
            state: None,
            startup: Duration::ZERO,
            released: false,
            handed_over: false,
        };
        if lab.lifetime == Lifetime::Attached {
            let files: Vec<PathBuf> = lab.ports.iter().map(|p| p.path().to_owned()).collect();
            lab.watchdog = Some(Watchdog::start(&lab.root, &me.to_string(), &files).await?);
        }
        fs::create_dir_all(&etcd_dir).map_err(|e| LabError::io("creating", &etcd_dir, e))?;
        for (i, cs) in spec.clusters.iter().enumerate() {
            let cluster = Cluster::prepare(ClusterSetup {
                spec: cs,
                root: &lab.root,
                binaries: &lab.binaries,
                etcd_url: &lab.etcd_url,
                api_port: lab.ports[2 + i].port(),
                lifetime: lab.lifetime,
                ready_timeout: spec.ready_timeout,
            })
            .await?;
            lab.clusters.push(cluster);
        }

        if lab.clusters.iter().any(|c| c.real_node_count() > 0) {
            lab.nodes = Some(RealNodes::prepare(&lab.root, &lab.clusters, &lab.binaries).await?);
        }

        lab.etcd.start(lab.lifetime).await?;
        lab.wait_etcd(spec.ready_timeout).await?;
        tracing::info!(elapsed = ?started.elapsed(), url = %lab.etcd_url, "etcd healthy");

        let state = Arc::new(LabState::new_file(&lab.root, lab.state_snapshot(&me))?);
        for c in &lab.clusters {
            c.attach_state(state.clone());
        }
        lab.state = Some(state);
        futures::future::try_join_all(lab.clusters.iter().map(|c| c.boot(&lab.etcd))).await?;
        if let Some(nodes) = &lab.nodes {
            nodes
                .start(&lab.clusters, lab.lifetime, spec.ready_timeout)
                .await?;
        }

        if lab.lifetime == Lifetime::Detached {
            // The ports stay reserved until `down`: hand them to etcd, which lives until then.
            let Some(owner) = lab.etcd.pid().and_then(ProcessToken::of) else {
                lab.etcd
                    .ensure_running("handing over the port reservations")?;
                return Err(LabError::State {
                    path: lab.state_path(),
                    message: "etcd's process vanished while handing over the ports".to_owned(),
                });
            };
            for p in &mut lab.ports {
                p.transfer(owner)?;
            }
            let token = owner.to_string();
            if let Some(state) = &lab.state {
                state.update(|s| s.reservation_token = token)?;
            }
        }
        lab.handed_over = lab.lifetime == Lifetime::Detached;
        lab.startup = started.elapsed();
        tracing::info!(elapsed = ?lab.startup, clusters = lab.clusters.len(), root = %lab.root.display(), "lab ready");
        Ok(lab)
    }

    fn state_snapshot(&self, me: &ProcessToken) -> LabState {
        let record = |s: &Supervised| ProcessRecord {
            component: s.spec.component.clone(),
            binary: s.spec.binary.clone(),
            log: s.spec.log.clone(),
            process: s.pid().and_then(ProcessToken::of),
        };
        LabState {
            format: 1,
            root: self.root.clone(),
            lifetime: self.lifetime,
            binaries: self.binaries.dir.clone(),
            etcd_url: self.etcd_url.clone(),
            etcd: record(&self.etcd),
            clusters: self
                .clusters
                .iter()
                .map(|c| ClusterRecord {
                    name: c.name().to_owned(),
                    api_url: c.api_url().to_owned(),
                    kubeconfig: c.kubeconfig_path().to_owned(),
                    pod_cidr: c.pod_cidr().to_string(),
                    service_cidr: c.service_cidr().to_string(),
                    log_dir: c.log_dir(),
                    components: c.components().iter().map(record).collect(),
                })
                .collect(),
            port_reservations: self.ports.iter().map(|p| p.path().to_owned()).collect(),
            reservation_token: me.to_string(),
            dataplane: None,
        }
    }

    async fn wait_etcd(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.etcd.ensure_running("waiting for /health")?;
            let last =
                match tokio::time::timeout(Duration::from_secs(3), etcd_health(&self.etcd_url))
                    .await
                {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => "no answer within 3s".to_owned(),
                };
            if Instant::now() >= deadline {
                return Err(self.etcd.spec.timeout("waiting for /health", timeout, last));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name() == name)
    }

    /// Every cluster, in spec order.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The lab's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lab's state file (`<root>/lab.json`).
    pub fn state_path(&self) -> PathBuf {
        LabState::path(&self.root)
    }

    /// The lifetime the lab was started with.
    pub fn lifetime(&self) -> Lifetime {
        self.lifetime
    }

    /// The binaries the lab runs.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// Every real node of the lab (see [`ClusterSpec::real_nodes`](crate::ClusterSpec::real_nodes)).
    pub fn real_nodes(&self) -> Vec<RealNodeInfo> {
        self.nodes
            .as_ref()
            .map(RealNodes::infos)
            .unwrap_or_default()
    }

    /// Imports an OCI image archive (e.g. from [`write_oci_archive`](crate::write_oci_archive))
    /// into the containerd of every real node of `cluster`, so pods there can run it with
    /// `imagePullPolicy: Never` or `IfNotPresent`.
    pub async fn import_image(&self, cluster: &str, archive: &Path) -> Result<()> {
        let Some(nodes) = &self.nodes else {
            return Err(LabError::Nodes("the lab has no real nodes".to_owned()));
        };
        let names: Vec<String> = nodes
            .infos()
            .into_iter()
            .filter(|n| n.cluster == cluster)
            .map(|n| n.name)
            .collect();
        if names.is_empty() {
            return Err(LabError::Nodes(format!(
                "cluster {cluster:?} has no real nodes"
            )));
        }
        for name in names {
            if let Some(node) = nodes.node(&name) {
                node.import_image(archive).await?;
            }
        }
        Ok(())
    }

    /// Routes the pod CIDR of cluster `to` from every real node of cluster `from` through the
    /// first real node of `to`, as an underlay that routes pod networks between clusters would
    /// (what a routed fabric expects). One direction: call it both ways for replies.
    pub async fn route_pod_network(&self, from: &str, to: &str) -> Result<()> {
        let target = self
            .cluster(to)
            .ok_or_else(|| LabError::Nodes(format!("no cluster {to:?}")))?;
        let nodes = self.real_nodes();
        let via = nodes
            .iter()
            .find(|n| n.cluster == to)
            .ok_or_else(|| LabError::Nodes(format!("cluster {to:?} has no real nodes")))?
            .ip;
        let mut routed = 0;
        for n in nodes.iter().filter(|n| n.cluster == from) {
            crate::dataplane::ip(
                Some(&n.netns),
                &[
                    "route",
                    "replace",
                    &target.pod_cidr().to_string(),
                    "via",
                    &via.to_string(),
                ],
            )
            .await?;
            routed += 1;
        }
        if routed == 0 {
            return Err(LabError::Nodes(format!(
                "cluster {from:?} has no real nodes"
            )));
        }
        Ok(())
    }

    /// The shared etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The shared etcd's log file (`<root>/etcd/etcd.log`).
    pub fn etcd_log_path(&self) -> &Path {
        &self.etcd.spec.log
    }

    /// How long [`start`](Lab::start) took.
    pub fn startup_duration(&self) -> Duration {
        self.startup
    }

    /// Every running process of the lab.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let mut out = Vec::new();
        if let Some(pid) = self.etcd.pid() {
            out.push(ProcessInfo {
                cluster: None,
                component: "etcd".to_owned(),
                pid,
                log: self.etcd.spec.log.clone(),
            });
        }
        for (node, component, pid, log) in self.nodes.iter().flat_map(RealNodes::processes) {
            let cluster = node.rsplit_once("-node-").map(|(c, _)| c.to_owned());
            out.push(ProcessInfo {
                cluster,
                component: format!("{component} ({node})"),
                pid,
                log,
            });
        }
        for c in &self.clusters {
            for comp in Component::ALL {
                if let Some(pid) = c.pid(comp) {
                    out.push(ProcessInfo {
                        cluster: Some(c.name().to_owned()),
                        component: comp.name().to_owned(),
                        pid,
                        log: c.log_path(comp).to_owned(),
                    });
                }
            }
        }
        out
    }

    /// Stops the lab gracefully (SIGTERM, then SIGKILL after 5 s; the clusters first, etcd last),
    /// removes its directory and releases its ports. Works for detached labs too.
    pub async fn stop(mut self) -> Result<()> {
        let mut first_err = None;
        if let Some(nodes) = &mut self.nodes {
            nodes.stop().await;
        }
        let stops = self.clusters.iter().map(|c| async move {
            // Kwok, scheduler and controller-manager first, the API server last.
            let mut errs = Vec::new();
            let others = [
                Component::Kwok,
                Component::Scheduler,
                Component::ControllerManager,
            ]
            .map(|comp| c.supervised(comp).stop(STOP_GRACE));
            for r in futures::future::join_all(others).await {
                if let Err(e) = r {
                    errs.push(e);
                }
            }
            if let Err(e) = c.supervised(Component::ApiServer).stop(STOP_GRACE).await {
                errs.push(e);
            }
            errs
        });
        for errs in futures::future::join_all(stops).await {
            for e in errs {
                tracing::warn!("{e}");
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.etcd.stop(STOP_GRACE).await {
            tracing::warn!("{e}");
            first_err.get_or_insert(e);
        }
        // Anything that could not be stopped gracefully is killed now.
        self.kill_all();
        if let Err(e) = self.remove_files() {
            first_err.get_or_insert(e);
        }
        self.released = true;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn kill_all(&mut self) {
        if let Some(nodes) = &mut self.nodes {
            nodes.kill();
        }
        for c in &self.clusters {
            for s in c.components() {
                s.kill_now();
            }
        }
        self.etcd.kill_now();
    }

    fn remove_files(&mut self) -> Result<()> {
        let removed = match fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LabError::io("removing the lab directory", &self.root, e)),
        };
        for p in self.ports.drain(..) {
            p.release();
        }
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        removed
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if self.handed_over {
            // A started detached lab outlives this handle: leave processes, ports and files.
            for c in &self.clusters {
                for s in c.components() {
                    s.forget();
                }
            }
            self.etcd.forget();
            for p in self.ports.drain(..) {
                p.persist();
            }
            return;
        }
        self.kill_all();
        if let Err(e) = self.remove_files() {
            tracing::warn!("cleaning up the lab: {e}");
        }
    }
}

fn prepare_root(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(root) = explicit {
        match fs::read_dir(root) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    if LabState::path(root).exists() {
                        return Err(LabError::AlreadyUp {
                            root: root.to_owned(),
                            detail: format!(
                                "{} exists; stop that lab first (liqo-lab down)",
                                LabState::path(root).display()
                            ),
                        });
                    }
                    return Err(LabError::InvalidSpec(format!(
                        "the lab root {} is not empty",
                        root.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(root).map_err(|e| LabError::io("creating", root, e))?;
            }
            Err(e) => return Err(LabError::io("reading", root, e)),
        }
        return Ok(root.to_owned());
    }
    let base = std::env::temp_dir().join("liqo-lab");
    fs::create_dir_all(&base).map_err(|e| LabError::io("creating", &base, e))?;
    let pid = std::process::id();
    for n in 0u32.. {
        let dir = base.join(format!("{pid}-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(LabError::io("creating", &dir, e)),
        }
    }
    Err(LabError::InvalidSpec(format!(
        "no free directory name under {}",
        base.display()
    )))
}

/// `GET /health` on etcd's client URL must report `"health":"true"`.
async fn etcd_health(url: &str) -> Result<(), String> {
    let addr = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    stream
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    if body.replace(' ', "").contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!("/health answered {:?}", body.trim()))
    }
}
