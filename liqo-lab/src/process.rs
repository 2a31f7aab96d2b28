//! Spawning, watching and stopping component processes.
//!
//! Attached components run as `setpriv --pdeathsig KILL -- <binary> ...`. The kernel delivers the
//! parent-death signal when the *thread* that forked the child exits, so every component is forked
//! by one dedicated thread ("lab-spawner") that lives until the process exits. The caller gets the
//! [`Child`] back and polls it with `try_wait`, so nothing here is tied to a Tokio runtime.

use std::{
    ffi::OsString,
    fs::{self, OpenOptions},
    io::{self, Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError, mpsc},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::sync::oneshot;

use crate::{
    error::{ComponentFailure, LabError, Result},
    spec::Lifetime,
};

/// How long a component gets between SIGTERM and SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(5);

/// Variables that would send the components' loopback traffic through a proxy.
const PROXY_VARS: &[&str] = &[
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

struct SpawnRequest {
    command: Command,
    reply: oneshot::Sender<io::Result<Child>>,
}

static SPAWNER: OnceLock<io::Result<mpsc::Sender<SpawnRequest>>> = OnceLock::new();

fn spawner() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    let slot = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("lab-spawner".to_owned())
            .spawn(move || {
                // The sender lives in a static, so this loop (and the thread, whose exit would
                // deliver the parent-death signal) lasts until the process exits.
                for mut req in rx {
                    match req.command.spawn() {
                        Ok(child) => {
                            // The requester gave up (its future was dropped): do not leave the
                            // process running unsupervised.
                            if let Err(Ok(mut child)) = req.reply.send(Ok(child)) {
                                let _ = child.kill();
                                let _ = child.wait();
                            }
                        }
                        Err(e) => {
                            let _ = req.reply.send(Err(e));
                        }
                    }
                }
            })?;
        Ok(tx)
    });
    slot.as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("starting the lab-spawner thread: {e}")))
}

/// Spawns `command` from the long-lived spawner thread.
pub(crate) async fn spawn_from_spawner_thread(command: Command) -> io::Result<Child> {
    let (reply, rx) = oneshot::channel();
    spawner()?
        .send(SpawnRequest { command, reply })
        .map_err(|_| io::Error::other("the lab-spawner thread is gone"))?;
    rx.await
        .map_err(|_| io::Error::other("the lab-spawner thread dropped the request"))?
}

/// How to run one component.
#[derive(Debug, Clone)]
pub(crate) struct CommandSpec {
    /// `cluster "name"` or `the lab` (for etcd).
    pub(crate) owner: String,
    /// The component's name, e.g. `kube-apiserver`.
    pub(crate) component: String,
    pub(crate) binary: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) log: PathBuf,
    pub(crate) workdir: PathBuf,
}

impl CommandSpec {
    fn command(&self, lifetime: Lifetime) -> Result<Command> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| LabError::io("opening the log", &self.log, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::io("opening the log", &self.log, e))?;
        let mut cmd = match lifetime {
            Lifetime::Attached => {
                let mut c = Command::new("setpriv");
                c.args(["--pdeathsig", "KILL", "--"]).arg(&self.binary);
                c
            }
            Lifetime::Detached => {
                let mut c = Command::new(&self.binary);
                c.process_group(0);
                c
            }
        };
        cmd.args(&self.args)
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        Ok(cmd)
    }

    fn failure(&self, phase: &str, reason: String) -> Box<ComponentFailure> {
        Box::new(ComponentFailure {
            owner: self.owner.clone(),
            component: self.component.clone(),
            phase: phase.to_owned(),
            reason,
            log: self.log.clone(),
            tail: tail_lines(&self.log, 20),
        })
    }

    pub(crate) fn exited(&self, phase: &str, status: ExitStatus) -> LabError {
        LabError::Exited(self.failure(phase, format!("exited ({status})")))
    }

    pub(crate) fn not_running(&self, phase: &str) -> LabError {
        LabError::Exited(self.failure(phase, "is not running".to_owned()))
    }

    pub(crate) fn timeout(&self, phase: &str, timeout: Duration, last: String) -> LabError {
        LabError::Timeout(self.failure(
            phase,
            format!("timed out after {timeout:?} (last check: {last})"),
        ))
    }
}

/// A component and, while it runs, its process.
#[derive(Debug)]
pub(crate) struct Supervised {
    pub(crate) spec: CommandSpec,
    child: Mutex<Option<Child>>,
}

impl Supervised {
    pub(crate) fn new(spec: CommandSpec) -> Self {
        Self {
            spec,
            child: Mutex::new(None),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The pid of the running process, if any.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.slot().as_ref().map(Child::id)
    }

    /// Starts the process. Fails if it is already running.
    pub(crate) async fn start(&self, lifetime: Lifetime) -> Result<u32> {
        if let Some(pid) = self.running_pid() {
            return Err(LabError::AlreadyRunning {
                owner: self.spec.owner.clone(),
                component: self.spec.component.clone(),
                pid,
            });
        }
        let cmd = self.spec.command(lifetime)?;
        let child = spawn_from_spawner_thread(cmd)
            .await
            .map_err(|source| LabError::Spawn {
                owner: self.spec.owner.clone(),
                component: self.spec.component.clone(),
                binary: self.spec.binary.clone(),
                log: self.spec.log.clone(),
                source,
            })?;
        let pid = child.id();
        tracing::debug!(owner = %self.spec.owner, component = %self.spec.component, pid, "started");
        let mut slot = self.slot();
        let concurrent = match slot.as_mut() {
            Some(other) => matches!(other.try_wait(), Ok(None)).then(|| other.id()),
            None => None,
        };
        if let Some(pid) = concurrent {
            // Someone started it concurrently: keep theirs, stop ours.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(LabError::AlreadyRunning {
                owner: self.spec.owner.clone(),
                component: self.spec.component.clone(),
                pid,
            });
        }
        *slot = Some(child);
        Ok(pid)
    }

    fn running_pid(&self) -> Option<u32> {
        let mut slot = self.slot();
        let child = slot.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => {
                *slot = None;
                None
            }
        }
    }

    /// Fails with [`LabError::Exited`] (naming `phase`) if the process has exited, or with a
    /// spawn-like error if it was never started.
    pub(crate) fn ensure_running(&self, phase: &str) -> Result<()> {
        let mut slot = self.slot();
        let Some(child) = slot.as_mut() else {
            return Err(self.spec.not_running(phase));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                *slot = None;
                Err(self.spec.exited(phase, status))
            }
            Err(source) => Err(LabError::Stop {
                owner: self.spec.owner.clone(),
                component: self.spec.component.clone(),
                pid: child.id(),
                source,
            }),
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after `grace`. Returns `None` if it was not
    /// running.
    pub(crate) async fn stop(&self, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(child) = self.slot().take() else {
            return Ok(None);
        };
        let pid = child.id();
        terminate(child, grace)
            .await
            .map(Some)
            .map_err(|source| LabError::Stop {
                owner: self.spec.owner.clone(),
                component: self.spec.component.clone(),
                pid,
                source,
            })
    }

    /// Kills the process with SIGKILL and reaps it, synchronously (for `Drop`).
    pub(crate) fn kill_now(&self) {
        if let Some(mut child) = self.slot().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Forgets the process without stopping it (detached labs).
    pub(crate) fn forget(&self) {
        self.slot().take();
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn signal(pid: u32, signal: Signal) -> io::Result<()> {
    let raw =
        i32::try_from(pid).map_err(|_| io::Error::other(format!("pid {pid} out of range")))?;
    match kill(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

async fn terminate(mut child: Child, grace: Duration) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    signal(child.id(), Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::debug!(pid = child.id(), "no exit after SIGTERM, sending SIGKILL");
    child.kill()?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Terminates a process we did not spawn (a detached lab's): SIGTERM, then SIGKILL after
/// `grace`; waits until it is gone or a zombie.
pub(crate) async fn terminate_pid(pid: u32, grace: Duration) -> io::Result<()> {
    let gone = || crate::procfs::ProcessToken::of(pid).is_none();
    if gone() {
        return Ok(());
    }
    signal(pid, Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if gone() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(pid, Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if gone() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(io::Error::other(format!(
        "pid {pid} survived SIGKILL for 5 s"
    )))
}

/// The last `n` lines of a log file (at most its last 64 KiB), or a note saying why there are none.
pub(crate) fn tail_lines(path: &Path, n: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            let tail = lines[start..].join("\n");
            if tail.is_empty() {
                "(the log is empty)".to_owned()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// Removes the lab's directory and its port reservations once this process is gone, however it
/// ends: a `sh` in its own process group waits for EOF on a pipe only we hold.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

const WATCHDOG_SCRIPT: &str = r#"read -r _ ; sleep 1
root=$1; token=$2; shift 2
[ -f "$root/nodes-cleanup.sh" ] && sh "$root/nodes-cleanup.sh"
rm -rf -- "$root"
for f in "$@"; do
  [ "$(cat -- "$f" 2>/dev/null)" = "$token" ] && rm -f -- "$f"
done
exit 0"#;

impl Watchdog {
    /// Starts a watchdog that removes `root` and every file of `reservations` that still holds
    /// `token`.
    pub(crate) async fn start(root: &Path, token: &str, reservations: &[PathBuf]) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("liqo-lab-watchdog")
            .arg(root)
            .arg(token)
            .args(reservations)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let mut child = spawn_from_spawner_thread(cmd)
            .await
            .map_err(|e| LabError::io("starting the clean-up watchdog (sh) for", root, e))?;
        let stdin = child.stdin.take();
        Ok(Self { child, stdin })
    }

    /// Stops the watchdog without letting it clean up (we cleaned up ourselves, or the lab is
    /// detached and must survive us).
    pub(crate) fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("liqo-lab-proc-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn tail_returns_last_lines() {
        let dir = scratch("tail");
        let log = dir.join("x.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&log, text).expect("write");
        let tail = tail_lines(&log, 3);
        assert_eq!(tail, "line 97\nline 98\nline 99");
        assert!(tail_lines(&dir.join("missing"), 3).contains("cannot read"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn supervised_reports_early_exit_with_log() {
        let dir = scratch("exit");
        let spec = CommandSpec {
            owner: "cluster \"t\"".into(),
            component: "false".into(),
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), "echo boom-from-component; exit 3".into()],
            log: dir.join("c.log"),
            workdir: dir.clone(),
        };
        let s = Supervised::new(spec);
        s.start(Lifetime::Attached).await.expect("start");
        let deadline = Instant::now() + Duration::from_secs(10);
        let err = loop {
            match s.ensure_running("waiting") {
                Ok(()) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(()) => panic!("never exited"),
                Err(e) => break e,
            }
        };
        let msg = err.to_string();
        assert!(msg.contains("boom-from-component"), "{msg}");
        assert!(msg.contains("c.log"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stop_terminates_and_reaps() {
        let dir = scratch("stop");
        let spec = CommandSpec {
            owner: "cluster \"t\"".into(),
            component: "sleep".into(),
            binary: "/bin/sleep".into(),
            args: vec!["300".into()],
            log: dir.join("s.log"),
            workdir: dir.clone(),
        };
        let s = Supervised::new(spec);
        let pid = s.start(Lifetime::Attached).await.expect("start");
        assert!(matches!(
            s.start(Lifetime::Attached).await,
            Err(LabError::AlreadyRunning { .. })
        ));
        let status = s
            .stop(STOP_GRACE)
            .await
            .expect("stop")
            .expect("was running");
        assert!(!status.success());
        assert!(!crate::procfs::pid_exists(pid));
        assert!(s.stop(STOP_GRACE).await.expect("stop").is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}
