//! An agent started again after a crash finds what its earlier run left (daemon, socket,
//! routes, rules, NAT) and replaces it, saying so in one log line; a daemon someone else runs
//! under the same name is refused, naming it. Needs root, `ip`, `nft`, `ping` and
//! `wireguard-go`; every namespace and process is removed by the topology, pass or fail.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use liqo_wireguard_userspace::{
    leftovers::{INTERFACE_ENV, OWNER_ENV, ProcessId},
    socket_path,
};
use serde_json::json;

const LINE: &str = "an earlier run left state behind";

/// Starts wireguard-go for `iface` in `ns` as the test's own child, with extra environment.
fn start_daemon(ns: &str, iface: &str, env: &[(&str, String)]) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "wireguard-go", "-f", iface])
        .env_remove(OWNER_ENV)
        .env_remove(INTERFACE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.spawn().expect("starting wireguard-go");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket_path(iface)).is_err() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not serve its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn log_of(t: &mut Topology, i: usize) -> String {
    std::fs::read_to_string(&t.agent(i).log).unwrap()
}

/// SIGKILL of the agent: the restarted agent replaces what the dead one left and the tunnel
/// comes back with the same key (the peer is not reconfigured beyond a repeated connect).
#[test]
fn crashed_agent_starts_again_over_its_leftovers() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 1);
    let b = t.add_cluster("milan", 1);
    let mut cfg = t.config(a, "wireguard-go");
    cfg["privateKey"] = json!(liqo_fabric_wireguard::generate_private_key().to_base64());
    t.start_with(a, &cfg).unwrap();
    t.start(b, "wireguard-go");
    let (la, _) = t.link(a, b);
    let a1 = t.clusters[a].pods[0].ns.clone();
    let target = seen(&la, t.clusters[b].pods[0].ip);
    assert!(wait_ping(&a1, target, Duration::from_secs(20)));

    // The crash: nothing is cleaned up by the agent.
    let gw = t.clusters[a].gw.clone();
    let mut dead = t.clusters[a].agent.take().unwrap();
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    drop(dead);
    // Routes went with the daemon's TUN (setpriv stops it with the agent); rules and NAT stay.
    assert!(ok_in(&gw, &["ip", "rule"]).contains(&format!("lookup {TABLE}")));
    assert!(ok_in(&gw, &["nft", "list", "tables"]).contains("liqo-"));

    t.start_with(a, &cfg)
        .unwrap_or_else(|e| panic!("start after a crash: {e}"));
    let log = log_of(&mut t, a);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(LINE)).collect();
    assert_eq!(lines.len(), 1, "{log}");
    eprintln!("{}", lines[0]);
    for what in ["policy rules", "nftables table inet liqo-"] {
        assert!(lines[0].contains(what), "{what}: {}", lines[0]);
    }
    t.link(a, b);
    assert!(
        wait_ping(&a1, target, Duration::from_secs(20)),
        "traffic did not resume after the restart"
    );
    t.shutdown_all();
    for c in &t.clusters {
        assert_clean(&c.gw, &c.iface);
    }
}

/// A daemon that outlived the run that started it (an agent without `setpriv`, or an older
/// one): marked for this interface and namespace by a process that is gone, it is replaced.
#[test]
fn daemon_left_running_by_an_earlier_run_is_replaced() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 0);
    let (gw, iface) = (t.clusters[a].gw.clone(), t.clusters[a].iface.clone());
    // The earlier run: a process that has exited since.
    let mut run = Command::new("sleep").arg("60").spawn().unwrap();
    let owner = ProcessId::of(i32::try_from(run.id()).unwrap()).unwrap();
    run.kill().unwrap();
    run.wait().unwrap();
    let daemon = start_daemon(
        &gw,
        &iface,
        &[(OWNER_ENV, owner.mark()), (INTERFACE_ENV, iface.clone())],
    );
    let old = daemon.id();
    t.adopt(daemon);

    t.start(a, "wireguard-go");
    let log = log_of(&mut t, a);
    let line = log
        .lines()
        .find(|l| l.contains(LINE))
        .unwrap_or_else(|| panic!("no leftovers line: {log}"));
    eprintln!("{line}");
    assert!(
        line.contains(&format!(
            "replaced daemon pid {old} (wireguard-go -f {iface})"
        )) && line.contains(&format!("left running by liqo-rs pid {} (gone)", owner.pid)),
        "{line}"
    );
    assert!(
        ProcessId::of(i32::try_from(old).unwrap()).is_none(),
        "the old daemon still runs"
    );
    let params = t.agent(a).call(json!({"op": "params"}));
    assert!(params.is_ok(), "{params:?}");
    t.shutdown_all();
    assert_clean(&gw, &iface);
}

/// A wireguard-go nobody in liqo-rs started, serving the same name: refused, naming it, and
/// left running.
#[test]
fn daemon_of_someone_else_is_refused_naming_it() {
    let mut t = Topology::new();
    let a = t.add_cluster("rome", 0);
    let (gw, iface) = (t.clusters[a].gw.clone(), t.clusters[a].iface.clone());
    let daemon = start_daemon(&gw, &iface, &[]);
    let pid = daemon.id();
    t.adopt(daemon);
    let e = Agent::start(&gw, &t.config(a, "wireguard-go"))
        .err()
        .expect("must be refused");
    for what in [
        format!("interface name {iface} is already served by another WireGuard daemon"),
        format!("pid {pid} (wireguard-go -f {iface})"),
        "not started by liqo-rs".to_owned(),
    ] {
        assert!(e.contains(&what), "{what}: {e}");
    }
    assert!(ProcessId::of(i32::try_from(pid).unwrap()).is_some());
    assert!(std::os::unix::net::UnixStream::connect(socket_path(&iface)).is_ok());
}
