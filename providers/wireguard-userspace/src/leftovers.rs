//! Telling our own leftover daemons from someone else's.
//!
//! Every wireguard-go this crate starts carries two variables in its environment:
//! [`OWNER_ENV`] (`<pid>:<start time>` of the process that started it) and [`INTERFACE_ENV`].
//! The process serving a control socket is found with `SO_PEERCRED`; its `/proc` entry then
//! says whether it carries our mark, for which interface, in which network namespace, and
//! whether the process that started it is still running (the start time makes a reused pid
//! harmless). A daemon is a leftover of ours only if it is marked for this interface, lives in
//! the namespace we act in, and its starter is gone; anything else is someone else's.

use std::path::Path;

/// Environment variable naming the process that started a daemon: `<pid>:<start time>`.
pub const OWNER_ENV: &str = "LIQO_WIREGUARD_OWNER";
/// Environment variable naming the interface a daemon was started for.
pub const INTERFACE_ENV: &str = "LIQO_WIREGUARD_INTERFACE";

/// A process, identified across pid reuse by its start time (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    /// Its pid.
    pub pid: i32,
    /// Its start time, field 22 of `/proc/<pid>/stat`.
    pub start: u64,
}

impl ProcessId {
    /// This process.
    pub fn current() -> Option<Self> {
        let pid = i32::try_from(std::process::id()).ok()?;
        Self::of(pid)
    }

    /// Process `pid` as it runs now, if it does. A zombie does not count, unless other
    /// threads of it still run: a Go program's main thread exits first, and its sockets and
    /// TUN are released only with the last thread.
    pub fn of(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ...`: comm may hold spaces and parentheses, so split after the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state); the start time is field 22.
        if matches!(fields.first(), Some(&"Z" | &"X")) && threads(pid) <= 1 {
            return None;
        }
        let start = fields.get(19)?.parse().ok()?;
        Some(Self { pid, start })
    }

    /// Whether this very process still runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid) == Some(*self)
    }

    /// The mark's form, `<pid>:<start>`.
    pub fn mark(&self) -> String {
        format!("{}:{}", self.pid, self.start)
    }

    fn parse(mark: &str) -> Option<Self> {
        let (pid, start) = mark.split_once(':')?;
        Some(Self {
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }
}

/// Whether `pid` is on its way out: killed or exiting (`PF_EXITING` in its flags, field 9 of
/// `/proc/<pid>/stat`), or its main thread already a zombie. Such a process may still serve its
/// socket for a moment while its environment is already unreadable, so it cannot be judged;
/// it is waited for instead.
pub fn is_exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); the flags are field 9.
    let zombie = matches!(fields.first(), Some(&"Z" | &"X"));
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    zombie || flags & PF_EXITING != 0
}

/// How many threads `pid` has (0 when it is gone).
fn threads(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The process serving a control socket, as `/proc` shows it.
#[derive(Debug, Clone)]
pub struct Server {
    /// The process, `None` if it is already gone.
    pub id: Option<ProcessId>,
    /// Its pid; 0 for a process of another pid namespace.
    pub pid: i32,
    /// Its command line, space-joined.
    pub cmdline: String,
    /// The process that started it, from [`OWNER_ENV`].
    pub owner: Option<ProcessId>,
    /// The interface it was started for, from [`INTERFACE_ENV`].
    pub interface: Option<String>,
    /// Its network namespace, `net:[inode]`.
    pub netns: Option<String>,
}

/// What to do with the process serving the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A daemon an earlier run of ours left running: replace it.
    Ours {
        /// The run that started it.
        owner: ProcessId,
    },
    /// Someone else's, and why it is not ours.
    Foreign(String),
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "<command line unreadable>".into())
}

/// The pid serving `socket`, `None` if nobody does (no file, or a stale one).
pub async fn serving_pid(socket: &Path) -> Option<i32> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    // 0: a process of another pid namespace, which this one cannot name.
    Some(stream.peer_cred().ok().and_then(|c| c.pid()).unwrap_or(0))
}

impl Server {
    /// What `/proc` says about `pid`.
    pub fn inspect(pid: i32) -> Self {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let var = |name: &str| {
            let prefix = format!("{name}=");
            environ
                .split(|c| *c == 0)
                .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        Self {
            id: ProcessId::of(pid),
            pid,
            cmdline: cmdline(pid),
            owner: var(OWNER_ENV).as_deref().and_then(ProcessId::parse),
            interface: var(INTERFACE_ENV),
            netns: std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .map(|l| l.to_string_lossy().into_owned()),
        }
    }

    /// Whether this is a daemon an earlier run of ours left for `iface` in namespace `netns`.
    pub fn judge(&self, iface: &str, netns: &str, me: Option<ProcessId>) -> Verdict {
        if self.pid == 0 {
            return Verdict::Foreign("a process of another pid namespace".into());
        }
        let Some(owner) = self.owner else {
            return Verdict::Foreign(format!(
                "not started by liqo-rs (no {OWNER_ENV} in its environment)"
            ));
        };
        if self.interface.as_deref() != Some(iface) {
            return Verdict::Foreign(format!(
                "started by liqo-rs for interface {}",
                self.interface.as_deref().unwrap_or("<unknown>")
            ));
        }
        if Some(owner) == me {
            return Verdict::Foreign("started by this process, which still runs it".into());
        }
        if owner.is_alive() {
            return Verdict::Foreign(format!(
                "started by liqo-rs process pid {} ({}), still running",
                owner.pid,
                cmdline(owner.pid)
            ));
        }
        if self.netns.as_deref() != Some(netns) {
            return Verdict::Foreign(format!(
                "left by an earlier liqo-rs run in another network namespace ({}; this gateway's is {netns})",
                self.netns.as_deref().unwrap_or("unknown")
            ));
        }
        Verdict::Ours { owner }
    }
}

/// Every live process marked for `iface`: a daemon whose socket is gone or no longer served
/// (one still exiting holds its TUN, and a new daemon could not create it).
pub fn marked_for(iface: &str) -> Vec<Server> {
    let mark = format!("{INTERFACE_ENV}={iface}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|c| *c == 0).any(|kv| kv == mark.as_bytes()))
        })
        .map(Server::inspect)
        .filter(|s| s.id.is_some())
        .collect()
}

/// Processes on their way out (see [`is_exiting`]) that still hold the TUN device `iface` open
/// (their `/proc/<pid>/fdinfo` says `iff: <iface>`): a daemon killed with its starter keeps the
/// device busy for a moment after its socket and environment are gone.
pub fn exiting_tun_holders(iface: &str) -> Vec<i32> {
    let want = format!("iff:\t{iface}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_exiting(*pid))
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .any(|fd| {
                    std::fs::read_to_string(fd.path())
                        .is_ok_and(|info| info.lines().any(|l| l == want))
                })
        })
        .collect()
}

/// The network namespace of the calling thread, `net:[inode]`.
pub fn thread_netns() -> std::io::Result<String> {
    std::fs::read_link("/proc/thread-self/ns/net").map(|l| l.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(owner: Option<ProcessId>, iface: &str, netns: &str) -> Server {
        Server {
            id: None,
            pid: 4242,
            cmdline: "wireguard-go -f x".into(),
            owner,
            interface: Some(iface.into()),
            netns: Some(netns.into()),
        }
    }

    #[test]
    fn only_a_marked_daemon_of_a_gone_run_here_is_ours() {
        let me = ProcessId::current().unwrap();
        assert!(me.is_alive());
        assert!(!is_exiting(me.pid));
        assert_eq!(ProcessId::parse(&me.mark()), Some(me));
        // A run that is gone: our pid with another start time.
        let gone = ProcessId {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!gone.is_alive());
        let ns = "net:[1]";
        assert_eq!(
            server(Some(gone), "liqo-a", ns).judge("liqo-a", ns, Some(me)),
            Verdict::Ours { owner: gone }
        );
        let why = |s: Server| match s.judge("liqo-a", ns, Some(me)) {
            Verdict::Foreign(w) => w,
            v => panic!("{v:?}"),
        };
        assert!(why(server(None, "liqo-a", ns)).contains("not started by liqo-rs"));
        assert!(why(server(Some(gone), "liqo-b", ns)).contains("for interface liqo-b"));
        assert!(why(server(Some(me), "liqo-a", ns)).contains("this process"));
        assert!(why(server(Some(gone), "liqo-a", "net:[2]")).contains("another network namespace"));
        let live = ProcessId::of(1).unwrap();
        assert!(why(server(Some(live), "liqo-a", ns)).contains("pid 1 "));
        assert!(ProcessId::parse("12").is_none() && ProcessId::parse("a:1").is_none());
    }
}
