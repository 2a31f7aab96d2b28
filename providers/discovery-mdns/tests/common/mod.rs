//! Network namespaces, veth links, `liqo-mdns` peers and avahi daemons for tests and benchmarks.
//!
//! Everything runs inside namespaces created here (`liqo-t-disc-<pid>-<n>`), joined by veth
//! pairs with a multicast route, so no packet reaches the host's network. Processes run under
//! `setpriv --pdeathsig KILL` (they die with the test process) and are killed on drop;
//! namespaces (and with them their veths) are deleted on drop, on success and on panic alike.
//! Namespaces left behind by a test process that was killed are removed by the next run.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;

const PREFIX: &str = "liqo-t-disc-";
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap_or_else(|e| panic!("{e}"));
}

/// Removes namespaces of earlier runs whose process is gone.
fn sweep_leftovers() {
    let Ok(list) = run(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(Command::new("ip").args(["netns", "del", name]));
        }
    }
}

/// A unique short id for this process and call.
pub fn unique() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        sweep_leftovers();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// One end of a link: its namespace, interface and address.
pub struct End {
    pub ns: Netns,
    pub ifname: String,
    pub addr: String,
}

/// Two namespaces joined by a veth pair, with addresses and a multicast route each.
pub struct Link {
    pub a: End,
    pub b: End,
}

impl Link {
    pub fn new() -> Self {
        let a = Netns::new();
        let b = Netns::new();
        let u = unique();
        // Interface names: at most 15 bytes, unique machine-wide while both exist.
        let (ia, ib) = (format!("lta{u}"), format!("ltb{u}"));
        let (ia, ib) = (
            ia[..ia.len().min(15)].to_owned(),
            ib[..ib.len().min(15)].to_owned(),
        );
        ip(&["link", "add", &ia, "type", "veth", "peer", "name", &ib]);
        // From here on the namespaces own the interfaces (deleted with them).
        ip(&["link", "set", &ia, "netns", &a.name]);
        ip(&["link", "set", &ib, "netns", &b.name]);
        let subnet = 10 + (COUNTER.fetch_add(1, Ordering::SeqCst) % 200);
        let (aa, ab) = (format!("10.213.{subnet}.1"), format!("10.213.{subnet}.2"));
        for (ns, ifname, addr) in [(&a, &ia, &aa), (&b, &ib, &ab)] {
            ip(&[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ]);
            ip(&["-n", &ns.name, "link", "set", ifname, "up"]);
            ip(&["-n", &ns.name, "route", "add", "224.0.0.0/4", "dev", ifname]);
        }
        Self {
            a: End {
                ns: a,
                ifname: ia,
                addr: aa,
            },
            b: End {
                ns: b,
                ifname: ib,
                addr: ab,
            },
        }
    }
}

/// A child process whose stdout lines are collected by a thread; killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.into(),
            child,
            stdin,
            lines: rx,
            seen: vec![],
        }
    }

    /// Waits for a line for which `pred` holds, up to `within`; returns it.
    pub fn wait_line(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no matching line within {within:?}; got {:#?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Whether a line matching `pred` arrives within `within` (does not panic).
    pub fn line_within(&mut self, within: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for a JSON event of kind `event` for which `pred` holds.
    pub fn wait_event(
        &mut self,
        within: Duration,
        event: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let line = self.wait_line(within, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event && pred(&v))
        });
        serde_json::from_str(&line).unwrap()
    }

    /// Like [`wait_event`](Self::wait_event), but an event already received counts too.
    pub fn seen_or_wait(
        &mut self,
        within: Duration,
        event: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let matches = |l: &str| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event && pred(&v))
        };
        if let Some(l) = self.seen.iter().find(|l| matches(l)) {
            return serde_json::from_str(l).unwrap();
        }
        let line = self.wait_line(within, matches);
        serde_json::from_str(&line).unwrap()
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin (a graceful stop for `liqo-mdns`) and waits for the exit.
    pub fn stop(&mut self, within: Duration) {
        self.stdin.take();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{} did not stop within {within:?}", self.name);
    }

    /// SIGKILL: no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ip netns exec <ns> <program> <args>` under a parent-death signal.
pub fn in_ns(ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec", &ns.name]);
    c.arg(program);
    c
}

/// The `liqo-mdns` binary of this crate.
pub fn liqo_mdns() -> &'static str {
    env!("CARGO_BIN_EXE_liqo-mdns")
}

/// A `liqo-mdns` peer in `end`'s namespace, on its interface, with `args`.
pub fn mdns_peer(name: &str, end: &End, args: &[&str]) -> Proc {
    let mut cmd = in_ns(&end.ns, liqo_mdns());
    cmd.args(["--interface", &end.ifname]).args(args);
    let mut p = Proc::spawn(name, &mut cmd);
    p.wait_event(Duration::from_secs(10), "ready", |_| true);
    p
}

/// An avahi-daemon with its own system D-Bus, in a mount namespace (tmpfs on /run) inside a
/// network namespace. Clients run with [`Avahi::client`].
pub struct Avahi {
    daemon: Proc,
    dbus: Proc,
    holder: Proc,
    dir: PathBuf,
}

impl Avahi {
    pub fn start(end: &End, host_name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("liqo-t-avahi-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        // Holds the mount namespace; /run is private to it (so are D-Bus's and avahi's sockets).
        let mut holder = Proc::spawn(
            "mount-ns holder",
            in_ns(&end.ns, "unshare").args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /run && mkdir -p /run/dbus /run/avahi-daemon && echo ready && exec sleep 3600",
            ]),
        );
        holder.wait_line(Duration::from_secs(10), |l| l == "ready");
        let pid = holder.pid().to_string();
        let enter = |program: &str| {
            let mut c = Command::new("setpriv");
            c.args([
                "--pdeathsig",
                "KILL",
                "--",
                "nsenter",
                "-t",
                &pid,
                "-m",
                "-n",
                program,
            ]);
            c
        };
        let dbus = Proc::spawn(
            "dbus-daemon",
            enter("dbus-daemon").args(["--system", "--nofork", "--nopidfile", "--print-address"]),
        );
        let mut dbus = dbus;
        dbus.wait_line(Duration::from_secs(10), |l| l.starts_with("unix:"));
        let conf = dir.join("avahi-daemon.conf");
        std::fs::write(
            &conf,
            format!(
                "[server]\nhost-name={host_name}\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces={}\n\
                 enable-dbus=yes\nratelimit-interval-usec=1000000\nratelimit-burst=1000\n\
                 [wide-area]\nenable-wide-area=no\n[publish]\npublish-hinfo=no\npublish-workstation=no\n",
                end.ifname
            ),
        )
        .unwrap();
        let mut cmd = enter("avahi-daemon");
        cmd.args(["--no-chroot", "--no-drop-root", "--no-rlimits", "-f"])
            .arg(&conf)
            .stderr(Stdio::piped());
        // avahi-daemon logs to stderr; follow it to know when it is up.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("avahi-daemon (Debian package avahi-daemon) must be installed");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Proc {
            name: "avahi-daemon".into(),
            child,
            stdin: None,
            lines: rx,
            seen: vec![],
        };
        daemon.wait_line(Duration::from_secs(15), |l| {
            l.contains("Server startup complete")
        });
        Self {
            daemon,
            dbus,
            holder,
            dir,
        }
    }

    /// A client command (avahi-browse, avahi-publish) in the daemon's namespaces.
    pub fn client(&self, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--", "nsenter", "-t"])
            .arg(self.holder.pid().to_string())
            .args(["-m", "-n", program]);
        c
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        self.daemon.kill();
        self.dbus.kill();
        self.holder.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
