//! Pod-to-pod throughput (iperf3, one TCP stream) and latency (ping) through:
//!
//! - **fabric**: our fabric, two clusters both on 10.244.0.0/16 (remapping + double NAT);
//! - **hand**: a hand-configured tunnel with the same WireGuard implementation (`wg` and `ip`
//!   by hand, distinct pod CIDRs, no NAT, no policy rules);
//! - **veth**: two pods on a plain veth pair;
//! - controls: **fabric-nonat** (our fabric, distinct CIDRs: no NAT rule; both implementations),
//!   **hand-policy** (the hand-made tunnel routed through a policy rule, as the fabric routes),
//!   and **nat-toggle**
//!   (one fabric tunnel with rules of the NAT's shape loaded and removed between ping bursts);
//!
//! for each userspace implementation (wireguard-go, boringtun). In each round every path is up
//! at once and the pings interleave in short bursts, so drifting load falls on all alike;
//! fabric/hand ratios are per round, their median is reported with its spread. As root:
//!
//! `BENCH_ROUNDS=8 BENCH_SECONDS=3 nice -n -15 cargo bench -p liqo-wireguard-userspace --bench fabric`
//! (`BENCH_ROUNDS`, default 3; `BENCH_SECONDS` per iperf3 run, default 5; `BENCH_CASES=a,b`
//! only the cases whose names contain a word; `BENCH_DUMP=1` prints each gateway's state;
//! `BENCH_FLOOD=1` pings back to back instead of every 10 ms).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    process::{Child, Command, Stdio},
};

use common::*;

struct Measure {
    gbits: f64,
    rtt_ms: f64,
}

/// One path between two pods, set up and kept until dropped.
struct Path {
    server_ns: String,
    client_ns: String,
    target: IpAddr,
    /// Gateway namespace of the client side (for BENCH_DUMP).
    gw: Option<String>,
    /// Tears the path down when dropped.
    guard: Box<dyn std::any::Any>,
}

fn iperf(server_ns: &str, client_ns: &str, target: IpAddr, seconds: u32) -> f64 {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            server_ns,
            "iperf3",
            "-s",
            "-1",
            "--forceflush",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (Debian package iperf3)");
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("Server listening") {
        line.clear();
    }
    let json = ok_in(
        client_ns,
        &[
            "iperf3",
            "-c",
            &target.to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&json).expect("iperf3 -J output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9
}

/// Pings per path and round, sent in [`BURSTS`] bursts interleaved with the other paths'.
/// One every 10 ms: below that, ping busy-waits and takes a whole core of the two.
const PINGS: usize = 500;
const BURSTS: usize = 10;

/// With BENCH_DUMP set, prints a gateway's routes, rules, WireGuard and nftables state.
fn dump(gw: &str) {
    if std::env::var("BENCH_DUMP").is_err() {
        return;
    }
    for cmd in [
        "ip rule",
        "ip route show table all",
        "wg show all",
        "ip -d link show",
        "nft list ruleset",
    ] {
        let args: Vec<&str> = cmd.split(' ').collect();
        eprintln!(
            "== {gw}: {cmd}\n{}",
            String::from_utf8_lossy(&in_ns(gw, &args).stdout)
        );
    }
}

/// Samples of ping round-trip times, in ms: one per ping, 10 ms apart; or, with
/// `BENCH_FLOOD` set, back to back (`ping -f`, 20 times as many, a busy path with warm
/// caches), where ping prints no per-packet time and the burst's average is the one sample.
fn pings(from_ns: &str, target: IpAddr, count: usize) -> Vec<f64> {
    let target = target.to_string();
    if std::env::var("BENCH_FLOOD").is_ok() {
        let n = (count * 20).to_string();
        let out = ok_in(from_ns, &["ping", "-f", "-c", &n, &target]);
        // "rtt min/avg/max/mdev = 0.071/0.093/0.402/0.012 ms"
        let avg = out
            .split("mdev = ")
            .nth(1)
            .and_then(|v| v.split('/').nth(1))
            .and_then(|v| v.parse().ok());
        return vec![avg.unwrap_or_else(|| panic!("no ping summary in: {out}"))];
    }
    let out = ok_in(
        from_ns,
        &["ping", "-c", &count.to_string(), "-i", "0.01", &target],
    );
    let times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").trim().parse().ok())
        .collect();
    assert!(times.len() * 10 >= count * 9, "ping lost replies: {out}");
    times
}

/// Our fabric between two clusters gone down: the agents remove what they set up.
struct FabricGuard(Topology);

impl Drop for FabricGuard {
    fn drop(&mut self) {
        self.0.shutdown_all();
    }
}

/// Through our fabric; `overlap`: both clusters on 10.244.0.0/16 (remapping + NAT), else
/// 10.1.0.0/16 and 10.2.0.0/16 (no NAT rule at all: isolates the NAT's cost).
fn fabric(implementation: &str, overlap: bool) -> Path {
    let mut t = Topology::new();
    let (a, b) = if overlap {
        (t.add_cluster("rome", 1), t.add_cluster("milan", 1))
    } else {
        (
            t.add_cluster_in("rome", 1, 1),
            t.add_cluster_in("milan", 1, 2),
        )
    };
    for i in [a, b] {
        let mut cfg = t.config(i, implementation);
        // Like the hand-made tunnel: no keepalive traffic during the measurement.
        cfg["keepalive"] = 0.into();
        if !overlap {
            cfg["local"]["podCidr"] = format!("10.{}.0.0/16", i + 1).into();
        }
        t.start_with(i, &cfg).unwrap();
    }
    let (la, _) = t.link(a, b);
    let target = seen(&la, t.clusters[b].pods[0].ip);
    assert!(wait_ping(
        &t.clusters[a].pods[0].ns,
        target,
        std::time::Duration::from_secs(5)
    ));
    Path {
        server_ns: t.clusters[b].pods[0].ns.clone(),
        client_ns: t.clusters[a].pods[0].ns.clone(),
        gw: Some(t.clusters[a].gw.clone()),
        target,
        guard: Box::new(FabricGuard(t)),
    }
}

/// A hand-made tunnel: its device helpers, then its namespaces.
struct HandGuard {
    devices: Vec<Child>,
    _topology: Topology,
}

impl Drop for HandGuard {
    fn drop(&mut self) {
        for d in &mut self.devices {
            // Closing stdin makes the device helper remove its interface.
            drop(d.stdin.take());
            let _ = d.wait();
        }
    }
}

/// A hand-configured tunnel; `policy`: its route in table 1818 behind a policy rule, as the
/// fabric routes (isolates the cost of policy routing).
fn hand(implementation: &str, policy: bool) -> Path {
    let mut t = Topology::new();
    let a = t.add_cluster_in("a", 1, 1);
    let b = t.add_cluster_in("b", 1, 2);
    let keys: Vec<_> = (0..2)
        .map(|_| liqo_fabric_wireguard::generate_private_key())
        .collect();
    let mut devices: Vec<Child> = vec![];
    for (i, peer, peer_net) in [(a, b, "10.2.0.0/16"), (b, a, "10.1.0.0/16")] {
        let (gw, iface) = (t.clusters[i].gw.clone(), t.clusters[i].iface.clone());
        let mut dev = Command::new("ip")
            .args([
                "netns",
                "exec",
                &gw,
                AGENT,
                "device",
                implementation,
                &iface,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(dev.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("@reply {\"ok\""), "{line}");
        let key_file = std::env::temp_dir().join(format!("liqo-bench-{iface}.key"));
        std::fs::write(&key_file, keys[i].to_base64()).unwrap();
        let peer_pub = keys[peer].get_public().to_base64();
        let endpoint = format!("{}:51820", t.clusters[peer].underlay);
        ok_in(
            &gw,
            &[
                "wg",
                "set",
                &iface,
                "private-key",
                key_file.to_str().unwrap(),
                "listen-port",
                "51820",
                "peer",
                &peer_pub,
                "allowed-ips",
                peer_net,
                "endpoint",
                &endpoint,
            ],
        );
        let _ = std::fs::remove_file(&key_file);
        ok_in(&gw, &["ip", "link", "set", &iface, "mtu", "1420", "up"]);
        if policy {
            ok_in(
                &gw,
                &[
                    "ip", "route", "add", peer_net, "dev", &iface, "table", "1818",
                ],
            );
            ok_in(
                &gw,
                &[
                    "ip", "rule", "add", "to", peer_net, "lookup", "1818", "pref", "1818",
                ],
            );
        } else {
            ok_in(&gw, &["ip", "route", "add", peer_net, "dev", &iface]);
        }
        ok_in(&gw, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        devices.push(dev);
    }
    let target = t.clusters[b].pods[0].ip;
    assert!(wait_ping(
        &t.clusters[a].pods[0].ns,
        target,
        std::time::Duration::from_secs(5)
    ));
    Path {
        server_ns: t.clusters[b].pods[0].ns.clone(),
        client_ns: t.clusters[a].pods[0].ns.clone(),
        gw: Some(t.clusters[a].gw.clone()),
        target,
        guard: Box::new(HandGuard {
            devices,
            _topology: t,
        }),
    }
}

fn veth() -> Path {
    let mut t = Topology::new();
    let (x, y) = (format!("lqvx{}", t.tag()), format!("lqvy{}", t.tag()));
    t.namespace(&x);
    t.namespace(&y);
    ok(&[
        "ip", "-n", &x, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &y,
    ]);
    ok(&["ip", "-n", &x, "addr", "add", "10.9.0.1/30", "dev", "eth0"]);
    ok(&["ip", "-n", &y, "addr", "add", "10.9.0.2/30", "dev", "eth0"]);
    ok(&["ip", "-n", &x, "link", "set", "eth0", "up"]);
    ok(&["ip", "-n", &y, "link", "set", "eth0", "up"]);
    let target: IpAddr = "10.9.0.2".parse().unwrap();
    assert!(wait_ping(&x, target, std::time::Duration::from_secs(5)));
    Path {
        server_ns: y,
        client_ns: x,
        target,
        gw: None,
        guard: Box::new(t),
    }
}

/// The NAT's own cost on one path, as a ratio of median RTTs: rules of the fabric's shape and
/// size (identity rewrites, so the pods' addresses stay valid) loaded and removed between short
/// ping bursts on the same tunnel. Unlike fabric/hand, nothing else differs between the two.
fn nat_toggle(implementation: &str) -> f64 {
    let path = fabric(implementation, false);
    let guard = path.guard.downcast_ref::<FabricGuard>();
    let t = &guard.expect("a fabric path").0;
    let set = |on: bool| {
        for (i, c) in t.clusters.iter().enumerate() {
            let (l, r, iface) = (i + 1, 2 - i, &c.iface);
            let mut script =
                "table inet liqo-toggle {}\ndelete table inet liqo-toggle\n".to_owned();
            if on {
                script.push_str(&format!(
                    "table inet liqo-toggle {{
  chain prerouting {{
    type filter hook prerouting priority raw; policy accept;
    iifname \"{iface}\" ip saddr 10.{r}.0.0/16 ip daddr 10.{l}.0.0/16 ip daddr set ip daddr & 0.0.255.255 | 10.{l}.0.0 notrack
  }}
  chain postrouting {{
    type filter hook postrouting priority srcnat; policy accept;
    oifname \"{iface}\" ip saddr 10.{l}.0.0/16 ip daddr 10.{r}.0.0/16 ip saddr set ip saddr & 0.0.255.255 | 10.{l}.0.0
  }}
}}
"
                ));
            }
            let f = std::env::temp_dir().join(format!("liqo-toggle-{}.nft", c.gw));
            std::fs::write(&f, script).unwrap();
            ok_in(&c.gw, &["nft", "-f", f.to_str().unwrap()]);
            let _ = std::fs::remove_file(f);
        }
    };
    let (mut on, mut off) = (vec![], vec![]);
    for k in 0..BURSTS * 2 {
        for state in if k % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            set(state);
            let v = pings(&path.client_ns, path.target, PINGS / BURSTS);
            if state { on.extend(v) } else { off.extend(v) }
        }
    }
    set(false);
    median(on) / median(off)
}

/// The median; NaN for a case that did not run.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// "median (min .. max)" of ratios, as a percentage change.
fn spread(ratios: &[f64]) -> String {
    let pct = |r: f64| format!("{:+.1}%", (r - 1.0) * 100.0);
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{} ({} .. {}, {} rounds)",
        pct(median(ratios.to_vec())),
        pct(min),
        pct(max),
        ratios.len()
    )
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: only run for real.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let env = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, seconds) = (env("BENCH_ROUNDS", 3), env("BENCH_SECONDS", 5));
    let cases = [
        "fabric wireguard-go",
        "hand wireguard-go",
        "fabric boringtun",
        "hand boringtun",
        "veth",
        "fabric-nonat wireguard-go",
        "hand-policy wireguard-go",
        "fabric-nonat boringtun",
    ];
    // BENCH_CASES=a,b runs only the cases whose name contains one of the words (quick checks).
    let only: Vec<String> = std::env::var("BENCH_CASES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let wanted = |case: &str| only.is_empty() || only.iter().any(|w| case.contains(w.as_str()));
    let mut results: Vec<Vec<Measure>> = cases.iter().map(|_| vec![]).collect();
    for round in 1..=rounds {
        // Every other round in reverse order, so no case is always set up or measured first.
        let mut order: Vec<usize> = (0..cases.len()).filter(|&i| wanted(cases[i])).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        // All the round's paths are up together and their pings interleave in short bursts:
        // the machine's state drifts over seconds, and each path gets the same share of it.
        let paths: Vec<(usize, Path)> = order
            .iter()
            .map(|&i| {
                let path = match cases[i] {
                    "fabric wireguard-go" => fabric("wireguard-go", true),
                    "hand wireguard-go" => hand("wireguard-go", false),
                    "hand-policy wireguard-go" => hand("wireguard-go", true),
                    "fabric boringtun" => fabric("boringtun", true),
                    "fabric-nonat wireguard-go" => fabric("wireguard-go", false),
                    "fabric-nonat boringtun" => fabric("boringtun", false),
                    "hand boringtun" => hand("boringtun", false),
                    "veth" => veth(),
                    other => unreachable!("unknown case {other}"),
                };
                if let Some(gw) = &path.gw {
                    dump(gw);
                }
                (i, path)
            })
            .collect();
        let mut samples: Vec<Vec<f64>> = cases.iter().map(|_| vec![]).collect();
        for _ in 0..BURSTS {
            for (i, p) in &paths {
                samples[*i].extend(pings(&p.client_ns, p.target, PINGS / BURSTS));
            }
        }
        for (i, p) in &paths {
            let m = Measure {
                gbits: iperf(&p.server_ns, &p.client_ns, p.target, seconds),
                rtt_ms: median(std::mem::take(&mut samples[*i])),
            };
            eprintln!(
                "round {round} {:26} {:6.3} Gbit/s  rtt {:.3} ms",
                cases[*i], m.gbits, m.rtt_ms
            );
            results[*i].push(m);
        }
    }
    let med: Vec<(f64, f64)> = results
        .iter()
        .map(|r| {
            (
                median(r.iter().map(|m| m.gbits).collect()),
                median(r.iter().map(|m| m.rtt_ms).collect()),
            )
        })
        .collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "| path | throughput (Gbit/s) | ping RTT (ms) |").unwrap();
    writeln!(out, "|---|---|---|").unwrap();
    for (case, (g, r)) in cases.iter().zip(&med) {
        if !g.is_nan() {
            writeln!(out, "| {case} | {g:.3} | {r:.3} |").unwrap();
        }
    }
    // Each fabric run is compared with the hand-made run of the same round (up at the same
    // time, pings interleaved); the ratios' median is the result, min .. max its spread.
    writeln!(
        out,
        "\n| against the hand-made tunnel | throughput | latency |\n|---|---|---|"
    )
    .unwrap();
    for (name, f, h) in [
        ("fabric, wireguard-go", 0, 1),
        ("fabric, boringtun", 2, 3),
        ("fabric-nonat, wireguard-go", 5, 1),
        ("fabric-nonat, boringtun", 7, 3),
        ("hand-policy, wireguard-go", 6, 1),
    ] {
        let pairs = results[f].iter().zip(&results[h]);
        let tput: Vec<f64> = pairs.clone().map(|(a, b)| a.gbits / b.gbits).collect();
        let lat: Vec<f64> = pairs.map(|(a, b)| a.rtt_ms / b.rtt_ms).collect();
        if tput.is_empty() {
            continue;
        }
        writeln!(out, "| {name} | {:.3}x | {} |", median(tput), spread(&lat)).unwrap();
    }
    // The NAT's own cost, on one tunnel with its rules toggled.
    for implementation in ["wireguard-go", "boringtun"] {
        if !wanted(&format!("nat-toggle {implementation}")) {
            continue;
        }
        let ratios: Vec<f64> = (0..rounds).map(|_| nat_toggle(implementation)).collect();
        writeln!(
            out,
            "\nNAT rules on/off on one {implementation} tunnel: latency {}",
            spread(&ratios)
        )
        .unwrap();
    }
    let fastest = if med[2].0.is_nan() || med[0].0 >= med[2].0 {
        "wireguard-go"
    } else {
        "boringtun"
    };
    writeln!(
        out,
        "fastest userspace backend through the fabric (throughput): {fastest}"
    )
    .unwrap();
}
