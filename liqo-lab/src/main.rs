//! `liqo-lab`: start, inspect and stop a detached lab of real Kubernetes control planes.

use std::{
    ffi::OsString,
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
        /// Number of clusters [default: 2, or the number of --names].
        #[arg(long)]
        clusters: Option<usize>,
        /// Clusters are named <prefix>-1, <prefix>-2, ...
        #[arg(long, default_value = "cluster")]
        name_prefix: String,
        /// Explicit cluster names, comma-separated (e.g. `a,b,c`); overrides --name-prefix.
        #[arg(long, value_delimiter = ',')]
        names: Option<Vec<String>>,
        /// Pod CIDR of every cluster (the same for all: overlapping on purpose).
        #[arg(long, default_value = DEFAULT_POD_CIDR)]
        pod_cidr: IpNet,
        /// Pod CIDR of each cluster, comma-separated, one per cluster in order (e.g.
        /// `10.244.0.0/16,10.244.0.0/16,10.245.0.0/16`); overrides --pod-cidr.
        #[arg(long, value_delimiter = ',', conflicts_with = "pod_cidr")]
        pod_cidrs: Option<Vec<IpNet>>,
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
        /// Also run the data plane in a background process: a gateway network namespace per
        /// cluster on a shared "wan" bridge, and a network namespace with an HTTP server for
        /// every pod labelled lab.liqo.io/netns=true on a lab worker node.
        #[arg(long)]
        dataplane: bool,
    },
    /// Show the lab's clusters (and data plane); exits non-zero if no lab is up.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop the lab (and its data plane) and remove its state (succeeds when no lab is up).
    Down,
    /// Send an HTTP GET from inside a pod's network namespace (needs `up --dataplane`) and print
    /// the answer's body; exits non-zero on any failure.
    Http {
        /// The cluster of the pod.
        #[arg(long)]
        cluster: String,
        /// The pod, as NAMESPACE/NAME.
        #[arg(long)]
        pod: String,
        /// Seconds the whole request may take.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// `http://<IP>[:port][/path]` (no DNS inside pod namespaces).
        url: String,
    },
    /// Run the data plane of the lab until SIGTERM (started by `up --dataplane`).
    #[command(hide = true)]
    DataplaneDaemon,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// A table.
    Table,
    /// JSON.
    Json,
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
            names,
            pod_cidr,
            pod_cidrs,
            service_cidr,
            workers,
            worker_cpu,
            worker_memory,
            worker_pods,
            timeout,
            dataplane,
        } => {
            let size = WorkerSpec::new(worker_cpu, worker_memory, worker_pods);
            match cluster_specs(clusters, &name_prefix, names, pod_cidr, pod_cidrs) {
                Ok(named) => {
                    let specs = named.into_iter().map(|(name, cidr)| {
                        ClusterSpec::new(name)
                            .pod_cidr(cidr)
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
                    up(&dir, spec, dataplane).await
                }
                Err(e) => Err(e),
            }
        }
        Command::Status { output } => status(&dir, output).await,
        Command::Down => down(&dir).await,
        Command::Http {
            cluster,
            pod,
            timeout,
            url,
        } => http(&dir, &cluster, &pod, &url, Duration::from_secs(timeout)).await,
        Command::DataplaneDaemon => liqo_lab::run_dataplane_daemon(&dir)
            .await
            .map(|()| ExitCode::SUCCESS),
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

/// The clusters' names and pod CIDRs from the command line.
fn cluster_specs(
    clusters: Option<usize>,
    prefix: &str,
    names: Option<Vec<String>>,
    pod_cidr: IpNet,
    pod_cidrs: Option<Vec<IpNet>>,
) -> Result<Vec<(String, IpNet)>, LabError> {
    let names = match (names, clusters) {
        (Some(n), Some(c)) if n.len() != c => {
            return Err(LabError::InvalidSpec(format!(
                "--clusters {c} but --names lists {} name(s)",
                n.len()
            )));
        }
        (Some(n), _) => n,
        (None, c) => (1..=c.unwrap_or(2))
            .map(|i| format!("{prefix}-{i}"))
            .collect(),
    };
    let cidrs = match pod_cidrs {
        Some(list) if list.len() != names.len() => {
            return Err(LabError::InvalidSpec(format!(
                "--pod-cidrs lists {} CIDR(s) for {} cluster(s); give one per cluster",
                list.len(),
                names.len()
            )));
        }
        Some(list) => list,
        None => vec![pod_cidr; names.len()],
    };
    Ok(names.into_iter().zip(cidrs).collect())
}

async fn up(dir: &Path, spec: LabSpec, dataplane: bool) -> Result<ExitCode, LabError> {
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
    if dataplane {
        let started = async {
            let exe = std::env::current_exe()
                .map_err(|e| LabError::DataPlane(format!("finding this program: {e}")))?;
            let args = [
                OsString::from("--state-dir"),
                dir.as_os_str().to_owned(),
                OsString::from("dataplane-daemon"),
            ];
            liqo_lab::start_dataplane_daemon(dir, &exe, &args).await
        };
        match started.await {
            Ok(record) => {
                let pid = record.process.process.map(|t| t.pid).unwrap_or_default();
                println!(
                    "data plane up (pid {pid}, log {})",
                    record.process.log.display()
                );
                for g in &record.gateways {
                    println!(
                        "{}: gateway netns {}  wan {}/{}",
                        g.cluster,
                        g.netns_path.display(),
                        g.wan_address,
                        g.wan_prefix_len
                    );
                }
            }
            Err(e) => {
                eprintln!("liqo-lab: the data plane did not start; stopping the lab");
                if let Err(down) = liqo_lab::down(dir).await {
                    eprintln!("liqo-lab: stopping the lab: {down}");
                }
                return Err(e);
            }
        }
    }
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

async fn status(dir: &Path, output: Output) -> Result<ExitCode, LabError> {
    let Some(state) = LabState::load(dir)? else {
        if output == Output::Json {
            println!("{}", serde_json::json!({ "up": false, "stateDir": dir }));
        } else {
            println!("no lab is up in {}", dir.display());
        }
        return Ok(ExitCode::FAILURE);
    };
    let etcd_up = state.etcd.is_running();
    let rows = futures::future::join_all(state.clusters.iter().map(cluster_row)).await;
    let running = !state.running_processes().is_empty();
    let gateway = |cluster: &str| {
        state
            .dataplane
            .as_ref()
            .and_then(|d| d.gateways.iter().find(|g| g.cluster == cluster))
    };
    if output == Output::Json {
        let clusters: Vec<serde_json::Value> = state
            .clusters
            .iter()
            .zip(&rows)
            .map(|(c, r)| {
                serde_json::json!({
                    "name": c.name,
                    "apiUrl": c.api_url,
                    "kubeconfig": c.kubeconfig,
                    "podCidr": c.pod_cidr,
                    "serviceCidr": c.service_cidr,
                    "ready": r.ready == "yes",
                    "readyDetail": r.ready,
                    "nodes": r.nodes.parse::<u64>().ok(),
                    "processes": r.processes,
                    "gateway": gateway(&c.name).map(|g| serde_json::json!({
                        "netns": g.netns,
                        "netnsPath": g.netns_path,
                        "wanAddress": g.wan_address,
                        "wanPrefixLength": g.wan_prefix_len,
                        "wanInterface": g.wan_interface,
                    })),
                })
            })
            .collect();
        let dataplane = state.dataplane.as_ref().map(|d| {
            serde_json::json!({
                "id": d.id,
                "pid": d.process.process.map(|t| t.pid),
                "running": d.process.is_running(),
                "log": d.process.log,
            })
        });
        let doc = serde_json::json!({
            "up": running,
            "stateFile": LabState::path(dir),
            "etcd": { "url": state.etcd_url, "running": etcd_up },
            "dataplane": dataplane,
            "clusters": clusters,
        });
        match serde_json::to_string_pretty(&doc) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                return Err(LabError::State {
                    path: LabState::path(dir),
                    message: format!("serializing the status: {e}"),
                });
            }
        }
        return Ok(if running {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
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
    if let Some(d) = &state.dataplane {
        let pid = d.process.process.map(|t| t.pid).unwrap_or_default();
        println!(
            "data plane: {} (pid {pid}, log {})",
            if d.process.is_running() {
                "running"
            } else {
                "not running"
            },
            d.process.log.display()
        );
        for g in &d.gateways {
            println!(
                "  {}: gateway netns {}  wan {}/{}",
                g.cluster,
                g.netns_path.display(),
                g.wan_address,
                g.wan_prefix_len
            );
        }
    }
    if !running {
        println!("no process of this lab is running; `liqo-lab down` removes its state");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

async fn http(
    dir: &Path,
    cluster: &str,
    pod: &str,
    url: &str,
    timeout: Duration,
) -> Result<ExitCode, LabError> {
    let Some(state) = LabState::load(dir)? else {
        return Err(LabError::State {
            path: LabState::path(dir),
            message: "no lab is up here".to_owned(),
        });
    };
    let Some(dp) = &state.dataplane else {
        return Err(LabError::DataPlane(
            "the lab runs no data plane; start it with `liqo-lab up --dataplane`".to_owned(),
        ));
    };
    if !dp.process.is_running() {
        return Err(LabError::DataPlane(format!(
            "the lab's data plane is not running (log {})",
            dp.process.log.display()
        )));
    }
    if !state.clusters.iter().any(|c| c.name == cluster) {
        let names: Vec<&str> = state.clusters.iter().map(|c| c.name.as_str()).collect();
        return Err(LabError::DataPlane(format!(
            "the lab has no cluster {cluster:?} (it has: {})",
            names.join(", ")
        )));
    }
    let Some((namespace, name)) = pod
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
    else {
        return Err(LabError::DataPlane(format!(
            "--pod {pod:?}: expected NAMESPACE/NAME"
        )));
    };
    let netns = liqo_lab::pod_netns_name(&dp.id, cluster, namespace, name);
    let path = liqo_lab::netns_path(&netns);
    if !path.exists() {
        return Err(LabError::NoPodNetwork {
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            pod: name.to_owned(),
        });
    }
    let body = liqo_lab::http_get_in(&path, url, timeout).await?;
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
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
