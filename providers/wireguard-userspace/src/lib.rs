//! # liqo-wireguard-userspace
//!
//! A [`WireGuardBackend`] for machines without the kernel WireGuard module: the interface is
//! a TUN device served by a userspace implementation, configured through `wireguard-control`'s
//! `Backend::Userspace` over the UAPI socket `/var/run/wireguard/<interface>.sock`.
//!
//! Two implementations, chosen by [`Implementation`]:
//!
//! - **wireguard-go** (Debian package `wireguard-go`): a daemon started per interface, in the
//!   foreground, and supervised: if it dies, it is started again and the gateway reapplies its
//!   configuration (through [`WireGuardBackend::restarts`]), so traffic resumes by itself.
//!   Readiness is the daemon's own "UAPI listener started" log line, not a poll of the socket.
//! - **boringtun** (crate, `device` feature): the device runs in this process on threads of its
//!   own, serving the same UAPI socket; it is recreated the same way if it stops. boringtun
//!   cannot modify an existing peer, which the gateway never asks for (it removes and re-adds a
//!   changed peer), and it reports the time *since* the last handshake where the protocol says
//!   the time *of* it, which [`WireGuardBackend::handshake_time`] corrects.
//!
//! Control sockets live in `/run/wireguard`, shared by every network namespace of the machine:
//! interface names must be unique machine-wide. [`Userspace::create`](WireGuardBackend::create)
//! refuses a name whose socket another live daemon serves, naming its pid and command line.
//!
//! ## After a crash
//!
//! A wireguard-go is started through `setpriv --pdeathsig TERM` when `setpriv` is installed,
//! so it stops when the thread that started it dies. A daemon can still outlive its agent
//! (no `setpriv`, an agent version without it): every daemon is marked in its environment with
//! the process that started it and its interface (see [`leftovers`]), and
//! [`clear_leftovers`](WireGuardBackend::clear_leftovers) replaces a daemon marked for the
//! same interface, in the same network namespace, whose starter is gone. It is replaced, not
//! adopted: it is not our child (no exit to supervise), its output pipes went with the dead
//! agent, and the gateway configures the new one from scratch anyway; the private key is the
//! agent's persisted one, so peers see the same key and only redo a handshake.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod leftovers;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use liqo_core::FabricError;
use liqo_fabric_wireguard::WireGuardBackend;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::{oneshot, watch},
};
use tracing::{debug, info, warn};

use crate::leftovers::{INTERFACE_ENV, OWNER_ENV, ProcessId, Server, Verdict};

/// Where userspace implementations put their control sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The control socket of `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Which userspace WireGuard serves the interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Implementation {
    /// The `wireguard-go` daemon, one process per interface.
    WireGuardGo {
        /// The binary to run.
        binary: PathBuf,
    },
    /// boringtun's device, in this process.
    Boringtun {
        /// Worker threads per device.
        threads: usize,
    },
}

impl Implementation {
    /// wireguard-go from `PATH`.
    pub fn wireguard_go() -> Self {
        Self::WireGuardGo {
            binary: "wireguard-go".into(),
        }
    }

    /// boringtun with one worker thread per CPU (at least two).
    pub fn boringtun() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, usize::from);
        Self::Boringtun {
            threads: cpus.max(2),
        }
    }

    /// The implementation named `name`: `wireguard-go` or `boringtun`.
    pub fn from_name(name: &str) -> Result<Self, FabricError> {
        match name {
            "wireguard-go" => Ok(Self::wireguard_go()),
            "boringtun" => Ok(Self::boringtun()),
            other => Err(FabricError::InvalidConfig(format!(
                "userspace WireGuard implementation {other:?}: expected wireguard-go or boringtun"
            ))),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::WireGuardGo { .. } => "wireguard-go",
            Self::Boringtun { .. } => "boringtun",
        }
    }
}

impl TryFrom<liqo_core::crds::WireGuardBackend> for Implementation {
    type Error = FabricError;

    /// The implementation a `Tunnel`'s `spec.backend` names; `Kernel` belongs to the
    /// `liqo-wireguard-kernel` crate.
    fn try_from(b: liqo_core::crds::WireGuardBackend) -> Result<Self, FabricError> {
        use liqo_core::crds::WireGuardBackend as B;
        match b {
            B::WireGuardGo => Ok(Self::wireguard_go()),
            B::Boringtun => Ok(Self::boringtun()),
            B::Kernel => Err(FabricError::InvalidConfig(
                "backend Kernel is not a userspace implementation: use liqo-wireguard-kernel"
                    .into(),
            )),
        }
    }
}

enum Running {
    /// The supervisor task; dropping `stop` (or sending) ends daemon and task.
    Daemon {
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    },
    Device {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    },
}

impl Running {
    fn is_alive(&self) -> bool {
        match self {
            Self::Daemon { task, .. } => !task.is_finished(),
            Self::Device { thread, .. } => !thread.is_finished(),
        }
    }
}

/// The userspace backend. Dropping it stops every daemon and device it runs.
pub struct Userspace {
    implementation: Implementation,
    running: Mutex<HashMap<String, Running>>,
    restarts: Arc<watch::Sender<u64>>,
    ready_timeout: Duration,
    /// This process, as daemons it starts are marked with.
    me: Option<ProcessId>,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace")
            .field("implementation", &self.implementation)
            .finish_non_exhaustive()
    }
}

fn backend_err(name: &str, message: String) -> FabricError {
    FabricError::Backend {
        backend: name.to_owned(),
        message,
    }
}

impl Userspace {
    /// A backend running `implementation`.
    pub fn new(implementation: Implementation) -> Self {
        Self {
            implementation,
            running: Mutex::new(HashMap::new()),
            restarts: Arc::new(watch::channel(0).0),
            ready_timeout: Duration::from_secs(10),
            me: ProcessId::current(),
        }
    }

    /// The implementation in use.
    pub fn implementation(&self) -> &Implementation {
        &self.implementation
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        // The map is consistent between statements; a panic elsewhere cannot corrupt it.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a live WireGuard implementation serves the control socket of `iface`.
    pub fn socket_in_use(iface: &str) -> bool {
        std::os::unix::net::UnixStream::connect(socket_path(iface)).is_ok()
    }

    /// Refuses a name another live daemon serves, saying whose; removes a stale socket file.
    async fn claim_socket(&self, iface: &str) -> Result<(), FabricError> {
        let path = socket_path(iface);
        if let Some(pid) = leftovers::serving_pid(&path).await {
            // A daemon still exiting (its starter killed a moment ago, the kernel's SIGTERM on
            // its way) accepts connections after its environment, which marks it as ours, is
            // gone: wait for it to go, then the socket is stale.
            if leftovers::is_exiting(pid) {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while ProcessId::of(pid).is_some() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if ProcessId::of(pid).is_none() {
                    debug!(interface = %iface, pid, "waited for an exiting daemon to go");
                    return Box::pin(self.claim_socket(iface)).await;
                }
            }
            let server = Server::inspect(pid);
            let netns = leftovers::thread_netns().unwrap_or_default();
            let why = match server.judge(iface, &netns, self.me) {
                Verdict::Foreign(why) => why,
                Verdict::Ours { owner } => format!(
                    "left by an earlier run (pid {}) that the gateway replaces at start",
                    owner.pid
                ),
            };
            return Err(backend_err(
                self.implementation.name(),
                format!(
                    "interface name {iface} is already served by another WireGuard daemon on this machine ({}): pid {pid} ({}), {why}; control sockets are shared by all network namespaces: pick a unique name or stop that daemon",
                    path.display(),
                    server.cmdline,
                ),
            ));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => debug!(path = %path.display(), "removed a stale control socket"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(backend_err(
                    self.implementation.name(),
                    format!("removing stale socket {}: {e}", path.display()),
                ));
            }
        }
        std::fs::create_dir_all(SOCKET_DIR).map_err(|e| {
            backend_err(
                self.implementation.name(),
                format!("creating {SOCKET_DIR}: {e}"),
            )
        })
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        for (iface, r) in self.running().drain() {
            match r {
                // Dropping the sender stops the supervisor, which kills the daemon
                // (kill_on_drop covers a runtime that is shutting down too).
                Running::Daemon { stop, .. } => drop(stop),
                Running::Device { stop, .. } => {
                    stop.store(true, Ordering::SeqCst);
                    let _ = std::fs::remove_file(socket_path(&iface));
                }
            }
        }
    }
}

/// `name` as found in `PATH` (as is if it names a path).
fn find_program(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Starts wireguard-go for `iface`, marked as started by `owner`, and returns once its UAPI
/// socket listens.
async fn start_wireguard_go(
    binary: &Path,
    iface: &str,
    timeout: Duration,
    owner: Option<ProcessId>,
) -> Result<Child, FabricError> {
    let err = |m: String| backend_err("wireguard-go", m);
    // Resolved here: behind setpriv, a missing binary would only be an exit status.
    let program = find_program(binary).ok_or_else(|| {
        err(format!(
            "starting {}: not found (install the wireguard-go package)",
            binary.display()
        ))
    })?;
    // The kernel signals the daemon when the thread that started it dies, our crash
    // included; the unsafe-free way to set that is setpriv, which then execs the daemon.
    let mut command = match find_program(Path::new("setpriv")) {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "TERM", "--"]).arg(&program);
            c
        }
        None => {
            debug!("setpriv not found: wireguard-go may outlive this process if it crashes");
            Command::new(&program)
        }
    };
    command
        .arg("-f")
        .arg(iface)
        // Verbose logging is what announces "UAPI listener started".
        .env("LOG_LEVEL", "verbose")
        .env(INTERFACE_ENV, iface)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(owner) = owner {
        command.env(OWNER_ENV, owner.mark());
    }
    let mut child = command
        .spawn()
        .map_err(|e| err(format!("starting {}: {e}", program.display())))?;
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Drain both pipes for the daemon's whole life, or it blocks on a full pipe.
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>);
    for pipe in [stdout, stderr].into_iter().flatten() {
        let tx = line_tx.clone();
        let iface = iface.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                tracing::trace!(interface = %iface, "wireguard-go: {l}");
                let _ = tx.send(l);
            }
        });
    }
    drop(line_tx);
    let mut last = Vec::new();
    let ready = tokio::time::timeout(timeout, async {
        while let Some(l) = line_rx.recv().await {
            if l.contains("UAPI listener started") {
                return true;
            }
            last.push(l);
        }
        false
    })
    .await;
    match ready {
        Ok(true) => Ok(child),
        Ok(false) => {
            let status = child.wait().await.ok();
            Err(err(format!(
                "wireguard-go for {iface} exited before serving its socket ({}): {}",
                status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                last.join(" | ")
            )))
        }
        Err(_) => {
            let _ = child.kill().await;
            Err(err(format!(
                "wireguard-go for {iface} did not serve its socket within {timeout:?}: {}",
                last.join(" | ")
            )))
        }
    }
}

/// Asks the daemon to stop (SIGTERM lets it remove its socket and TUN), then kills it.
async fn stop_child(mut child: Child, iface: &str) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_file(socket_path(iface));
}

/// Stops a leftover daemon: SIGTERM (it removes its socket and TUN), then SIGKILL.
async fn stop_leftover(server: &Server) -> Result<(), String> {
    use nix::sys::signal::{Signal, kill};
    let Some(id) = server.id else {
        return Ok(());
    };
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let _ = kill(nix::unistd::Pid::from_raw(id.pid), signal);
        // Not our child: there is no exit to wait for, so watch /proc for it to go.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if !id.is_alive() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err(format!(
        "leftover daemon pid {} ({}) survived SIGKILL",
        id.pid, server.cmdline
    ))
}

async fn supervise(
    mut child: Child,
    binary: PathBuf,
    iface: String,
    mut stop: oneshot::Receiver<()>,
    restarts: Arc<watch::Sender<u64>>,
    timeout: Duration,
    owner: Option<ProcessId>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => {
                stop_child(child, &iface).await;
                return;
            }
            status = child.wait() => {
                warn!(interface = %iface, status = ?status, "wireguard-go exited; restarting it");
                let _ = std::fs::remove_file(socket_path(&iface));
                let mut backoff = Duration::from_millis(100);
                child = loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    match start_wireguard_go(&binary, &iface, timeout, owner).await {
                        Ok(c) => break c,
                        Err(e) => {
                            warn!(interface = %iface, error = %e, "restarting wireguard-go failed");
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                };
                info!(interface = %iface, "wireguard-go restarted");
                restarts.send_modify(|n| *n += 1);
            }
        }
    }
}

fn run_boringtun(
    iface: String,
    threads: usize,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    restarts: Arc<watch::Sender<u64>>,
) {
    use boringtun::device::{DeviceConfig, DeviceHandle};
    let config = DeviceConfig {
        n_threads: threads,
        ..DeviceConfig::default()
    };
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::SeqCst) {
        match DeviceHandle::new(&iface, config) {
            Ok(mut handle) => {
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    None => {
                        info!(interface = %iface, "boringtun device recreated");
                        restarts.send_modify(|n| *n += 1);
                    }
                }
                backoff = Duration::from_millis(100);
                // `wait` re-raises a worker thread's panic; contain it so the device is
                // recreated instead of this thread dying.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle.wait()));
                drop(handle);
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                warn!(interface = %iface, panicked = r.is_err(), "boringtun device stopped; recreating it");
            }
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(format!("creating device {iface}: {e}")));
                    return;
                }
                warn!(interface = %iface, error = %e, "recreating the boringtun device failed");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        std::thread::sleep(backoff);
    }
}

#[async_trait]
impl WireGuardBackend for Userspace {
    fn name(&self) -> &str {
        self.implementation.name()
    }

    fn control(&self) -> liqo_fabric_wireguard::wireguard_control::Backend {
        liqo_fabric_wireguard::wireguard_control::Backend::Userspace
    }

    async fn create(&self, iface: &str) -> Result<(), FabricError> {
        liqo_fabric_wireguard::backend::check_interface_name(iface)?;
        if self.running().get(iface).is_some_and(Running::is_alive) {
            return Ok(());
        }
        self.claim_socket(iface).await?;
        let running = match &self.implementation {
            Implementation::WireGuardGo { binary } => {
                let child = match start_wireguard_go(binary, iface, self.ready_timeout, self.me)
                    .await
                {
                    Ok(c) => c,
                    // The device is still held by a daemon on its way out (killed with its
                    // starter a moment ago): once it is gone, the device is free.
                    Err(e) if e.to_string().contains("device or resource busy") => {
                        let holders = leftovers::exiting_tun_holders(iface);
                        if holders.is_empty() {
                            return Err(e);
                        }
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                        while holders.iter().any(|p| ProcessId::of(*p).is_some())
                            && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        debug!(interface = %iface, ?holders, "waited for exiting daemons to release the device");
                        start_wireguard_go(binary, iface, self.ready_timeout, self.me).await?
                    }
                    Err(e) => return Err(e),
                };
                let (stop, stop_rx) = oneshot::channel();
                let task = tokio::spawn(supervise(
                    child,
                    binary.clone(),
                    iface.to_owned(),
                    stop_rx,
                    self.restarts.clone(),
                    self.ready_timeout,
                    self.me,
                ));
                Running::Daemon { stop, task }
            }
            Implementation::Boringtun { threads } => {
                let stop = Arc::new(AtomicBool::new(false));
                let (tx, rx) = std::sync::mpsc::channel();
                let (name, threads, s, r) = (
                    iface.to_owned(),
                    *threads,
                    stop.clone(),
                    self.restarts.clone(),
                );
                // A thread of its own: boringtun blocks SIGINT/SIGTERM on the thread that
                // creates a device (for its signalfd); confined here, the rest of the process
                // keeps its signal handling.
                let thread = std::thread::Builder::new()
                    .name(format!("boringtun-{iface}"))
                    .spawn(move || run_boringtun(name, threads, s, tx, r))
                    .map_err(|e| backend_err("boringtun", format!("spawning a thread: {e}")))?;
                let res = tokio::task::spawn_blocking(move || rx.recv())
                    .await
                    .map_err(|e| FabricError::Other(e.into()))?;
                match res {
                    Ok(Ok(())) => {}
                    Ok(Err(m)) => return Err(backend_err("boringtun", m)),
                    Err(_) => {
                        return Err(backend_err(
                            "boringtun",
                            format!("device thread for {iface} ended before reporting"),
                        ));
                    }
                }
                Running::Device { stop, thread }
            }
        };
        self.running().insert(iface.to_owned(), running);
        Ok(())
    }

    async fn remove(&self, iface: &str) -> Result<(), FabricError> {
        let running = self.running().remove(iface);
        match running {
            Some(Running::Daemon { stop, task }) => {
                let _ = stop.send(());
                let _ = task.await;
            }
            Some(Running::Device { stop, thread }) => {
                stop.store(true, Ordering::SeqCst);
                // boringtun exits when its control socket disappears (it checks every second).
                let _ = std::fs::remove_file(socket_path(iface));
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            // Not ours: never touch a socket another daemon may serve.
            None => return Ok(()),
        }
        // Whatever happened to our daemon, leave no socket of ours behind.
        match std::fs::remove_file(socket_path(iface)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(backend_err(
                    self.name(),
                    format!("removing {}: {e}", socket_path(iface).display()),
                ));
            }
        }
        Ok(())
    }

    async fn clear_leftovers(&self, iface: &str) -> Result<Vec<String>, FabricError> {
        if self.running().get(iface).is_some_and(Running::is_alive) {
            return Ok(Vec::new());
        }
        let netns = leftovers::thread_netns().map_err(|e| {
            backend_err(self.name(), format!("reading this thread's namespace: {e}"))
        })?;
        let path = socket_path(iface);
        let serving = leftovers::serving_pid(&path).await;
        let mut servers = Vec::new();
        if let Some(pid) = serving {
            servers.push(Server::inspect(pid));
        }
        // Also a daemon of ours no longer serving its socket, such as one still exiting.
        servers.extend(
            leftovers::marked_for(iface)
                .into_iter()
                .filter(|s| Some(s.pid) != serving),
        );
        let mut done = Vec::new();
        for server in servers {
            // Someone else's is left alone: create refuses the name, saying whose it is.
            let Verdict::Ours { owner } = server.judge(iface, &netns, self.me) else {
                if Some(server.pid) == serving {
                    return Ok(Vec::new());
                }
                continue;
            };
            stop_leftover(&server)
                .await
                .map_err(|m| backend_err(self.name(), m))?;
            done.push(format!(
                "replaced daemon pid {} ({}) left running by liqo-rs pid {} (gone)",
                server.pid, server.cmdline, owner.pid
            ));
        }
        if std::fs::remove_file(&path).is_ok() && done.is_empty() {
            done.push(format!(
                "removed control socket {} (its daemon is gone)",
                path.display()
            ));
        }
        Ok(done)
    }

    fn restarts(&self) -> watch::Receiver<u64> {
        self.restarts.subscribe()
    }

    fn handshake_time(&self, reported: Option<SystemTime>, rx_bytes: u64) -> Option<SystemTime> {
        match self.implementation {
            Implementation::WireGuardGo { .. } => reported,
            // boringtun writes the time elapsed since the handshake into
            // last_handshake_time_sec, which wireguard-control reads as seconds since the epoch
            // and drops when it is 0: bytes received without a time mean "under a second ago"
            // (nothing is received before a handshake completes).
            Implementation::Boringtun { .. } => match reported {
                Some(t) => {
                    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                    Some(SystemTime::now() - since)
                }
                None if rx_bytes > 0 => Some(SystemTime::now()),
                None => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implementation_names() {
        assert_eq!(
            Implementation::from_name("wireguard-go").unwrap(),
            Implementation::wireguard_go()
        );
        assert!(
            matches!(Implementation::from_name("boringtun").unwrap(), Implementation::Boringtun { threads } if threads >= 2)
        );
        let e = Implementation::from_name("wg").unwrap_err().to_string();
        assert!(e.contains("expected wireguard-go or boringtun"), "{e}");
        use liqo_core::crds::WireGuardBackend as B;
        assert_eq!(
            Implementation::try_from(B::WireGuardGo).unwrap(),
            Implementation::wireguard_go()
        );
        assert_eq!(
            Implementation::try_from(B::Boringtun).unwrap(),
            Implementation::boringtun()
        );
        assert!(
            Implementation::try_from(B::Kernel)
                .unwrap_err()
                .to_string()
                .contains("liqo-wireguard-kernel")
        );
    }

    #[test]
    fn boringtun_handshake_age_is_corrected() {
        let b = Userspace::new(Implementation::Boringtun { threads: 1 });
        let reported = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
        let fixed = b.handshake_time(Some(reported), 10).unwrap();
        let age = SystemTime::now().duration_since(fixed).unwrap();
        assert!(
            age >= Duration::from_secs(7) && age < Duration::from_secs(9),
            "{age:?}"
        );
        assert!(
            b.handshake_time(None, 10).is_some(),
            "bytes received: handshake under 1 s ago"
        );
        assert_eq!(b.handshake_time(None, 0), None);
        let g = Userspace::new(Implementation::wireguard_go());
        assert_eq!(g.handshake_time(Some(reported), 10), Some(reported));
        assert_eq!(g.handshake_time(None, 10), None);
    }
}
