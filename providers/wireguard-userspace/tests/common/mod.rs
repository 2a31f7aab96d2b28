//! Test topologies in network namespaces: each "cluster" is a gateway namespace with pod
//! namespaces behind it (all pods in 10.244.0.0/16); gateways meet on an underlay bridge
//! (172.31.0.0/24) in a namespace of its own. Everything is removed on drop, failure included.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use liqo_core::{CidrMapping, NetworkParameters, PeerLink};
use serde_json::{Value, json};

pub const AGENT: &str = env!("CARGO_BIN_EXE_liqo-gateway-agent");
pub const TABLE: &str = "1818";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and call, short enough for interface names.
pub fn unique() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn in_ns(ns: &str, args: &[&str]) -> Output {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

pub fn ok_in(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    ok(&full)
}

pub struct Pod {
    pub ns: String,
    pub ip: IpAddr,
}

pub struct Cluster {
    pub id: String,
    pub gw: String,
    pub iface: String,
    pub underlay: String,
    pub pods: Vec<Pod>,
    pub agent: Option<Agent>,
}

pub struct Topology {
    tag: String,
    wan: String,
    pub clusters: Vec<Cluster>,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Topology {
    pub fn new() -> Self {
        let tag = unique();
        let wan = format!("lqw{tag}");
        ok(&["ip", "netns", "add", &wan]);
        let t = Self {
            tag,
            wan: wan.clone(),
            clusters: vec![],
            namespaces: vec![wan.clone()],
            children: vec![],
        };
        ok(&["ip", "-n", &wan, "link", "add", "br0", "type", "bridge"]);
        ok(&["ip", "-n", &wan, "link", "set", "br0", "up"]);
        t
    }

    fn add_ns(&mut self, name: &str) {
        ok(&["ip", "netns", "add", name]);
        self.namespaces.push(name.to_owned());
        ok(&["ip", "-n", name, "link", "set", "lo", "up"]);
    }

    /// Adds cluster `id` with `pods` pods in 10.244.0.0/16; returns its index.
    pub fn add_cluster(&mut self, id: &str, pods: usize) -> usize {
        self.add_cluster_in(id, pods, 244)
    }

    /// Adds cluster `id` with `pods` pods in 10.`octet`.0.0/16; returns its index.
    pub fn add_cluster_in(&mut self, id: &str, pods: usize, octet: u8) -> usize {
        let i = self.clusters.len();
        let gw = format!("lqg{}{i}", self.tag);
        self.add_ns(&gw);
        // Strict reverse-path filtering: the design must not need it relaxed.
        ok_in(
            &gw,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.rp_filter=1",
                "net.ipv4.conf.default.rp_filter=1",
            ],
        );
        let port = format!("p{i}");
        ok(&[
            "ip", "-n", &gw, "link", "add", "up0", "type", "veth", "peer", "name", &port, "netns",
            &self.wan,
        ]);
        ok(&[
            "ip", "-n", &self.wan, "link", "set", &port, "master", "br0", "up",
        ]);
        let underlay = format!("172.31.0.{}", i + 1);
        ok(&[
            "ip",
            "-n",
            &gw,
            "addr",
            "add",
            &format!("{underlay}/24"),
            "dev",
            "up0",
        ]);
        ok(&["ip", "-n", &gw, "link", "set", "up0", "up"]);
        let mut list = vec![];
        for k in 1..=pods {
            let ns = format!("lqp{}{i}{k}", self.tag);
            self.add_ns(&ns);
            let side = format!("pod{k}");
            ok(&[
                "ip", "-n", &gw, "link", "add", &side, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            ok(&[
                "ip",
                "-n",
                &gw,
                "addr",
                "add",
                &format!("10.{octet}.{k}.1/24"),
                "dev",
                &side,
            ]);
            ok(&["ip", "-n", &gw, "link", "set", &side, "up"]);
            ok(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{octet}.{k}.2/24"),
                "dev",
                "eth0",
            ]);
            ok(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            ok(&[
                "ip",
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{octet}.{k}.1"),
            ]);
            list.push(Pod {
                ns,
                ip: format!("10.{octet}.{k}.2").parse().unwrap(),
            });
        }
        self.clusters.push(Cluster {
            id: id.to_owned(),
            gw,
            iface: format!("lq{}{i}", self.tag),
            underlay,
            pods: list,
            agent: None,
        });
        i
    }

    /// The agent config of cluster `i`, to adjust before [`start`](Self::start).
    pub fn config(&self, i: usize, implementation: &str) -> Value {
        let c = &self.clusters[i];
        let mut local = NetworkParameters::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.96.0.0/12".parse().unwrap(),
        );
        local.gateway_endpoint = Some(format!("{}:51820", c.underlay));
        json!({
            "implementation": implementation,
            "interface": c.iface,
            "listenPort": 51820,
            "local": local,
            "keepalive": 1,
            "reserved": ["172.31.0.0/24"],
        })
    }

    pub fn start_with(&mut self, i: usize, config: &Value) -> Result<(), String> {
        let agent = Agent::start(&self.clusters[i].gw, config)?;
        self.clusters[i].agent = Some(agent);
        Ok(())
    }

    pub fn start(&mut self, i: usize, implementation: &str) {
        let cfg = self.config(i, implementation);
        self.start_with(i, &cfg)
            .unwrap_or_else(|e| panic!("starting gateway {i}: {e}"));
    }

    pub fn agent(&mut self, i: usize) -> &mut Agent {
        self.clusters[i].agent.as_mut().expect("agent started")
    }

    /// Connects clusters `a` and `b` both ways and exchanges how each maps the other.
    pub fn link(&mut self, a: usize, b: usize) -> (PeerLink, PeerLink) {
        let (ida, idb) = (self.clusters[a].id.clone(), self.clusters[b].id.clone());
        let pa = self.agent(a).call(json!({"op": "params"})).unwrap();
        let pb = self.agent(b).call(json!({"op": "params"})).unwrap();
        let la: PeerLink = serde_json::from_value(
            self.agent(a)
                .call(json!({"op": "connect", "cluster": idb, "params": pb}))
                .unwrap(),
        )
        .unwrap();
        let lb: PeerLink = serde_json::from_value(
            self.agent(b)
                .call(json!({"op": "connect", "cluster": ida, "params": pa}))
                .unwrap(),
        )
        .unwrap();
        self.agent(a)
            .call(
                json!({"op": "set_local_mappings", "cluster": idb, "mappings": lb.remote_mappings}),
            )
            .unwrap();
        self.agent(b)
            .call(
                json!({"op": "set_local_mappings", "cluster": ida, "mappings": la.remote_mappings}),
            )
            .unwrap();
        (la, lb)
    }

    /// Starts a TCP echo server (it answers with the source address it saw) in `ns`.
    /// Keeps `child` until the topology is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Adds a bare namespace removed with the topology.
    pub fn namespace(&mut self, name: &str) {
        self.add_ns(name);
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn echo_server(&mut self, ns: &str, port: u16) {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                AGENT,
                "echo-server",
                &format!("0.0.0.0:{port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        self.children.push(child);
    }

    /// Stops every agent (each removes what it made) and checks each said so.
    pub fn shutdown_all(&mut self) {
        for c in &mut self.clusters {
            if let Some(mut a) = c.agent.take() {
                let r = a.call(json!({"op": "shutdown"}));
                assert_eq!(r, Ok(json!("stopped")), "shutdown of {}", c.id);
                let _ = a.child.wait();
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for c in &mut self.clusters {
            drop(c.agent.take());
        }
        // Whatever is left in our namespaces (a daemon of a killed agent) goes too.
        for ns in &self.namespaces {
            let pids = run(&["ip", "netns", "pids", ns]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run(&["kill", "-9", pid]);
            }
            let _ = run(&["ip", "netns", "del", ns]);
        }
        for c in &self.clusters {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", c.iface));
        }
    }
}

pub struct Agent {
    /// Its log (stderr), kept when a test fails.
    pub log: std::path::PathBuf,
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("agent log: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl Agent {
    pub fn start(ns: &str, config: &Value) -> Result<Self, String> {
        let log_path = std::env::temp_dir().join(format!("liqo-agent-{ns}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, AGENT, "gateway", &config.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut a = Self {
            log: log_path,
            child,
            stdin,
            stdout,
        };
        match a.read_reply() {
            Ok(_) => Ok(a),
            Err(e) => {
                let _ = a.child.wait();
                Err(e)
            }
        }
    }

    fn read_reply(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).unwrap_or(0) == 0 {
                return Err("agent exited without answering".into());
            }
            if let Some(r) = line.strip_prefix("@reply ") {
                let v: Value = serde_json::from_str(r).unwrap();
                return match v.get("ok") {
                    Some(ok) => Ok(ok.clone()),
                    None => Err(v["err"].as_str().unwrap_or_default().to_owned()),
                };
            }
        }
    }

    pub fn call(&mut self, req: Value) -> Result<Value, String> {
        writeln!(self.stdin, "{req}").unwrap();
        self.stdin.flush().unwrap();
        self.read_reply()
    }
}

/// Where pod `ip` of the peer is reached, through the peer link's mappings.
pub fn seen(link: &PeerLink, ip: IpAddr) -> IpAddr {
    link.remote_mappings
        .iter()
        .find_map(|m: &CidrMapping| m.to_remapped(ip))
        .expect("address inside a mapped CIDR")
}

pub fn ping(ns: &str, ip: IpAddr, count: u32) -> bool {
    in_ns(
        ns,
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &ip.to_string(),
        ],
    )
    .status
    .success()
}

/// Waits (bounded) until `ns` can ping `ip`.
pub fn wait_ping(ns: &str, ip: IpAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ping(ns, ip, 1) {
            return true;
        }
    }
    false
}

/// Sends `msg` from `ns` to `ip:port` and returns (source address the server saw, echoed message).
pub fn tcp(ns: &str, ip: IpAddr, port: u16, msg: &str) -> (String, String) {
    let out = ok_in(ns, &[AGENT, "tcp-client", &format!("{ip}:{port}"), msg]);
    let (src, echoed) = out
        .trim()
        .split_once(' ')
        .expect("answer is '<source> <message>'");
    (src.to_owned(), echoed.to_owned())
}

/// The routes of our table in `ns` (none when the table does not exist).
pub fn table_routes(ns: &str) -> String {
    let o = in_ns(ns, &["ip", "route", "show", "table", TABLE]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() || err.contains("FIB table does not exist"),
        "ip route: {err}"
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts nothing of ours is left in gateway namespace `ns` for interface `iface`.
pub fn assert_clean(ns: &str, iface: &str) {
    let tables = ok_in(ns, &["nft", "list", "tables"]);
    assert!(
        !tables.contains("liqo-"),
        "nftables tables left in {ns}: {tables}"
    );
    let rules = ok_in(ns, &["ip", "rule"]) + &ok_in(ns, &["ip", "-6", "rule"]);
    assert!(
        !rules.contains(&format!("lookup {TABLE}")),
        "rules left in {ns}: {rules}"
    );
    let routes = table_routes(ns);
    assert!(routes.trim().is_empty(), "routes left in {ns}: {routes}");
    let all_routes = ok_in(ns, &["ip", "route", "show", "table", "all"]);
    assert!(
        !all_routes.contains(iface),
        "routes through {iface} left in {ns}: {all_routes}"
    );
    let links = ok_in(ns, &["ip", "-o", "link"]);
    assert!(!links.contains(iface), "link {iface} left in {ns}: {links}");
    let sock = format!("/var/run/wireguard/{iface}.sock");
    assert!(!std::path::Path::new(&sock).exists(), "socket {sock} left");
    let pids = ok(&["ip", "netns", "pids", ns]);
    assert!(pids.trim().is_empty(), "processes left in {ns}: {pids}");
}
