//! Pod-to-pod throughput (iperf3, one TCP stream) and latency (ping) through:
//!
//! - **fabric**: our fabric, two clusters both on 10.244.0.0/16 (remapping + double NAT);
//! - **hand**: a hand-configured tunnel with the same WireGuard implementation (`wg` and `ip`
//!   by hand, distinct pod CIDRs, no NAT, no policy rules);
//! - **veth**: two pods on a plain veth pair;
//!
//! for each userspace implementation (wireguard-go, boringtun), interleaved over several
//! rounds; medians are reported, and fabric/hand ratios are medians of the ratios of runs made
//! back to back (robust to load drifting over minutes). Run as root:
//!
//! `CARGO_TARGET_DIR=/work/target-net cargo bench -p liqo-wireguard-userspace --bench fabric`
//! (`BENCH_ROUNDS`, default 3; `BENCH_SECONDS` per iperf3 run, default 5).

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

/// The median round-trip time of 100 pings, in ms: robust to the few scheduler outliers a busy
/// 2-core machine adds, which move ping's own average by more than the paths differ.
fn rtt(from_ns: &str, target: IpAddr) -> f64 {
    let out = ok_in(
        from_ns,
        &["ping", "-c", "100", "-i", "0.05", &target.to_string()],
    );
    let times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").trim().parse().ok())
        .collect();
    assert!(times.len() >= 90, "ping lost replies: {out}");
    median(times)
}

fn measure(t_server: &str, t_client: &str, target: IpAddr, seconds: u32) -> Measure {
    let rtt_ms = rtt(t_client, target);
    let gbits = iperf(t_server, t_client, target, seconds);
    Measure { gbits, rtt_ms }
}

/// Through our fabric; `overlap`: both clusters on 10.244.0.0/16 (remapping + NAT), else
/// 10.1.0.0/16 and 10.2.0.0/16 (no NAT rule at all: isolates the NAT's cost).
fn fabric(implementation: &str, seconds: u32, overlap: bool) -> Measure {
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
        cfg["keepalive"] = serde_json::Value::Null;
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
    let m = measure(
        &t.clusters[b].pods[0].ns,
        &t.clusters[a].pods[0].ns,
        target,
        seconds,
    );
    t.shutdown_all();
    m
}

/// A hand-configured tunnel; `policy`: its route in table 1818 behind a policy rule, as the
/// fabric routes (isolates the cost of policy routing).
fn hand(implementation: &str, seconds: u32, policy: bool) -> Measure {
    let mut t = Topology::new();
    let a = t.add_cluster_in("a", 1, 1);
    let b = t.add_cluster_in("b", 1, 2);
    let keys: Vec<_> = (0..2).map(|_| liqo_net::generate_private_key()).collect();
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
    let m = measure(
        &t.clusters[b].pods[0].ns,
        &t.clusters[a].pods[0].ns,
        target,
        seconds,
    );
    for mut d in devices {
        // Closing stdin makes the device helper remove its interface.
        drop(d.stdin.take());
        let _ = d.wait();
    }
    m
}

fn veth(seconds: u32) -> Measure {
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
    measure(&y, &x, target, seconds)
}

/// The median; NaN for a case that did not run.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
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
    ];
    // BENCH_CASES=a,b runs only the cases whose name contains one of the words (quick checks).
    let only: Vec<String> = std::env::var("BENCH_CASES")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let wanted = |case: &str| only.is_empty() || only.iter().any(|w| case.contains(w.as_str()));
    let mut results: Vec<Vec<Measure>> = cases.iter().map(|_| vec![]).collect();
    for round in 1..=rounds {
        for (i, case) in cases.iter().enumerate() {
            if !wanted(case) {
                continue;
            }
            let m = match *case {
                "fabric wireguard-go" => fabric("wireguard-go", seconds, true),
                "hand wireguard-go" => hand("wireguard-go", seconds, false),
                "hand-policy wireguard-go" => hand("wireguard-go", seconds, true),
                "fabric boringtun" => fabric("boringtun", seconds, true),
                "fabric-nonat wireguard-go" => fabric("wireguard-go", seconds, false),
                "hand boringtun" => hand("boringtun", seconds, false),
                "veth" => veth(seconds),
                other => unreachable!("unknown case {other}"),
            };
            eprintln!(
                "round {round} {case:22} {:6.3} Gbit/s  rtt {:.3} ms",
                m.gbits, m.rtt_ms
            );
            results[i].push(m);
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
    // Load from other work drifts over minutes: compare each fabric run with the hand-made
    // tunnel run right after it, and take the median of those paired ratios.
    for (name, f, h) in [
        ("wireguard-go", 0, 1),
        ("boringtun", 2, 3),
        ("wireguard-go without NAT (distinct CIDRs)", 5, 1),
        ("hand-made wireguard-go tunnel with a policy rule", 6, 1),
    ] {
        let tput = median(
            results[f]
                .iter()
                .zip(&results[h])
                .map(|(a, b)| a.gbits / b.gbits)
                .collect(),
        );
        let lat = median(
            results[f]
                .iter()
                .zip(&results[h])
                .map(|(a, b)| a.rtt_ms / b.rtt_ms)
                .collect(),
        );
        if tput.is_nan() {
            continue;
        }
        writeln!(
            out,
            "\n{name}: /hand throughput {tput:.3}x (median of paired runs), latency {:+.1}%",
            (lat - 1.0) * 100.0
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
        "fastest userspace backend through the fabric: {fastest}"
    )
    .unwrap();
}
