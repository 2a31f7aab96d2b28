//! Measures the lab: time to start 1, 2 and 3 clusters (each with 2 kwok workers, ready to
//! schedule) and the resident memory of an idle cluster, several runs each.
//!
//! `cargo run --release -p liqo-lab --example lab_bench -- [runs]` (default 3 runs).
//! Binaries come from `$LIQO_LAB_BIN_DIR` or `scripts/lab-binaries.sh`, as for the tests.

use std::time::Duration;

use liqo_lab::{ClusterSpec, Lab, LabSpec};

/// Resident set size of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(3);
    let mut medians = vec![];
    for n in 1..=3usize {
        let mut times = vec![];
        for run in 0..runs {
            let spec = LabSpec::new((1..=n).map(|i| ClusterSpec::new(format!("bench-{i}"))));
            let lab = Lab::start(spec).await?;
            times.push(lab.startup_duration());
            if n == 1 && run == 0 {
                // Let the controllers settle, then read memory of the idle cluster.
                tokio::time::sleep(Duration::from_secs(20)).await;
                let mut total = 0;
                println!("idle memory of one cluster (RSS):");
                for p in lab.processes() {
                    let kib = rss_kib(p.pid);
                    total += kib;
                    println!("  {:<26} {:>6.1} MiB", p.component, kib as f64 / 1024.0);
                }
                println!(
                    "  {:<26} {:>6.1} MiB (etcd included)",
                    "total",
                    total as f64 / 1024.0
                );
            }
            lab.stop().await?;
        }
        let m = median(times.clone());
        println!("{n} cluster(s): start times {times:.1?}, median {m:.1?}");
        medians.push(m);
    }
    for (i, m) in medians.iter().enumerate() {
        println!(
            "{} cluster(s) / 1 cluster: {:.2}x",
            i + 1,
            m.as_secs_f64() / medians[0].as_secs_f64()
        );
    }
    Ok(())
}
