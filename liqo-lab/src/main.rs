//! `liqo-lab`: start, inspect and stop a detached lab of real Kubernetes control planes.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use liqo_lab::{
    ClusterRecord, ClusterSpec, DEFAULT_POD_CIDR, DEFAULT_SERVICE_CIDR, DownOutcome, IpNet, Lab,
    LabError, LabSpec, LabState, Lifetime, WorkerSpec,
};
use tracing_subscriber::EnvFilter;

/// Real Kubernetes control planes (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
/// kwok) on this machine.
#[derive(Debug, Parser)]
#[command(name = "liqo-lab", version)]
struct Cli {
    /// Directory of the lab's state and files [default: $XDG_STATE_HOME/liqo-lab or
    /// ~/.local/state/liqo-lab].
    #[arg(long, global = true, env = "LIQO_LAB_STATE_DIR")]
    state_dir: Option<PathBuf>,

    /// Directory with etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and
    /// kwok-stages/ [default: $LIQO_LAB_BIN_DIR, else built by scripts/lab-binaries.sh].
    #[arg(long, global = true)]
    binaries: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a lab that keeps running after this command returns.
    Up {
        /// Number of clusters.
        #[arg(long, default_value_t = 2)]
        clusters: usize,
        /// Clusters are named <prefix>-1, <prefix>-2, ...
        #[arg(long, default_value = "cluster")]
        name_prefix: String,
        /// Pod CIDR of every cluster (the same for all: overlapping on purpose).
        #[arg(long, default_value = DEFAULT_POD_CIDR)]
        pod_cidr: IpNet,
        /// Service CIDR of every cluster.
        #[arg(long, default_value = DEFAULT_SERVICE_CIDR)]
        service_cidr: IpNet,
        /// Worker nodes per cluster.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// CPU capacity of each worker.
        #[arg(long, default_value = "8")]
        worker_cpu: String,
        /// Memory capacity of each worker.
        #[arg(long, default_value = "32Gi")]
        worker_memory: String,
        /// Pod capacity of each worker.
        #[arg(long, default_value_t = 110)]
        worker_pods: u32,
        /// Seconds to wait for each start-up phase.
        #[arg(long, default_value_t = 240)]
        timeout: u64,
    },
    /// Show the lab's clusters; exits non-zero if no lab is up.
    Status,
    /// Stop the lab and remove its state (succeeds when no lab is up).
    Down,
}

fn default_state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("liqo-lab")
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube logs every failed readiness probe at error level while an API server starts.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let result = match cli.command {
        Command::Up {
            clusters,
            name_prefix,
            pod_cidr,
            service_cidr,
            workers,
            worker_cpu,
            worker_memory,
            worker_pods,
            timeout,
        } => {
            let size = WorkerSpec::new(worker_cpu, worker_memory, worker_pods);
            let specs = (1..=clusters).map(|i| {
                ClusterSpec::new(format!("{name_prefix}-{i}"))
                    .pod_cidr(pod_cidr)
                    .service_cidr(service_cidr)
                    .workers(workers, size.clone())
            });
            let mut spec = LabSpec::new(specs)
                .root(&dir)
                .lifetime(Lifetime::Detached)
                .ready_timeout(Duration::from_secs(timeout));
            if let Some(b) = cli.binaries {
                spec = spec.binaries(b);
            }
            up(&dir, spec).await
        }
        Command::Status => status(&dir).await,
        Command::Down => down(&dir).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("liqo-lab: error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

async fn up(dir: &Path, spec: LabSpec) -> Result<ExitCode, LabError> {
    if let Some(state) = LabState::load(dir)? {
        let running = state.running_processes();
        if !running.is_empty() {
            let detail = running
                .iter()
                .map(|(owner, p)| {
                    let pid = p.process.map(|t| t.pid).unwrap_or_default();
                    format!("{owner}/{} (pid {pid})", p.component)
                })
                .collect::<Vec<_>>()
                .join(", ");
            return Err(LabError::AlreadyUp {
                root: dir.to_owned(),
                detail: format!("{detail} still running; run `liqo-lab down` first"),
            });
        }
        eprintln!(
            "liqo-lab: removing the state of a lab that is no longer running in {}",
            dir.display()
        );
        liqo_lab::down(dir).await?;
    }
    let lab = Lab::start(spec).await?;
    let mut paths = Vec::new();
    println!(
        "lab up in {:.1?} (state: {})",
        lab.startup_duration(),
        lab.state_path().display()
    );
    for c in lab.clusters() {
        println!(
            "{}: {}  kubeconfig {}  (pods {}, services {})",
            c.name(),
            c.api_url(),
            c.kubeconfig_path().display(),
            c.pod_cidr(),
            c.service_cidr()
        );
        paths.push(c.kubeconfig_path().display().to_string());
    }
    println!("export KUBECONFIG={}", paths.join(":"));
    // Dropping a detached lab leaves it running.
    drop(lab);
    Ok(ExitCode::SUCCESS)
}

struct Row {
    name: String,
    api_url: String,
    ready: String,
    nodes: String,
    processes: String,
    kubeconfig: String,
}

async fn cluster_row(c: &ClusterRecord) -> Row {
    let running = c.components.iter().filter(|p| p.is_running()).count();
    let (ready, nodes) = match client_for(&c.kubeconfig).await {
        Ok(client) => {
            let req = http::Request::get("/readyz").body(Vec::new());
            let ready = match req {
                Ok(req) => {
                    match tokio::time::timeout(Duration::from_secs(5), client.request_text(req))
                        .await
                    {
                        Ok(Ok(t)) if t.trim() == "ok" => "yes".to_owned(),
                        Ok(Ok(t)) => format!("no ({})", t.trim()),
                        Ok(Err(e)) => format!("no ({e})"),
                        Err(_) => "no (timeout)".to_owned(),
                    }
                }
                Err(e) => format!("no ({e})"),
            };
            let nodes: Api<Node> = Api::all(client);
            let count = match tokio::time::timeout(
                Duration::from_secs(5),
                nodes.list_metadata(&ListParams::default()),
            )
            .await
            {
                Ok(Ok(list)) => list.items.len().to_string(),
                _ => "?".to_owned(),
            };
            (ready, count)
        }
        Err(e) => (format!("no ({e})"), "?".to_owned()),
    };
    Row {
        name: c.name.clone(),
        api_url: c.api_url.clone(),
        ready,
        nodes,
        processes: format!("{running}/{}", c.components.len()),
        kubeconfig: c.kubeconfig.display().to_string(),
    }
}

async fn client_for(kubeconfig: &Path) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| e.to_string())?;
    config.proxy_url = None;
    config.connect_timeout = Some(Duration::from_secs(3));
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

async fn status(dir: &Path) -> Result<ExitCode, LabError> {
    let Some(state) = LabState::load(dir)? else {
        println!("no lab is up in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    };
    let etcd_up = state.etcd.is_running();
    let rows = futures::future::join_all(state.clusters.iter().map(cluster_row)).await;
    let header = Row {
        name: "NAME".into(),
        api_url: "API URL".into(),
        ready: "READY".into(),
        nodes: "NODES".into(),
        processes: "PROCESSES".into(),
        kubeconfig: "KUBECONFIG".into(),
    };
    let all: Vec<&Row> = std::iter::once(&header).chain(&rows).collect();
    let w = |f: fn(&Row) -> &str| all.iter().map(|r| f(r).len()).max().unwrap_or(0);
    let (wn, wu, wr, wd, wp) = (
        w(|r| &r.name),
        w(|r| &r.api_url),
        w(|r| &r.ready),
        w(|r| &r.nodes),
        w(|r| &r.processes),
    );
    for r in &all {
        println!(
            "{:wn$}  {:wu$}  {:wr$}  {:wd$}  {:wp$}  {}",
            r.name, r.api_url, r.ready, r.nodes, r.processes, r.kubeconfig
        );
    }
    println!(
        "etcd: {} ({}), state: {}",
        state.etcd_url,
        if etcd_up { "running" } else { "not running" },
        LabState::path(dir).display()
    );
    if state.running_processes().is_empty() {
        println!("no process of this lab is running; `liqo-lab down` removes its state");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn down(dir: &Path) -> Result<ExitCode, LabError> {
    match liqo_lab::down(dir).await? {
        DownOutcome::Stopped { processes } => {
            println!(
                "stopped {processes} process(es) and removed {}",
                dir.display()
            );
        }
        _ => println!("no lab is up in {}", dir.display()),
    }
    Ok(ExitCode::SUCCESS)
}
