//! `liqo-agent`: the reference agent of liqo-rs.
//!
//! Composes discovery (mDNS, DNS-SD, static, hand-made `ForeignCluster`s), peering (the CSR
//! authority: HTTPS endpoint, quota, credential rotation, `ForeignCluster`-driven peering), the
//! network fabric and the virtual kubelet (consumer and provider) from a YAML file and flags;
//! serves `/metrics`, `/healthz` and `/readyz`; logs through `tracing` (text or JSON).
//!
//! ```text
//! liqo-agent --config agent.yaml [--kubeconfig PATH] [--cluster-name NAME]
//!            [--metrics-addr ADDR] [--log-format text|json]
//! ```
//!
//! SIGTERM or SIGINT stops every controller and exits 0; peerings, tunnels and offloaded
//! workloads are left running (a restarted agent converges again).

mod compose;
mod config;
mod metrics;
mod network;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The liqo-rs reference agent.
#[derive(Debug, Parser)]
#[command(name = "liqo-agent", version, about)]
struct Args {
    /// The configuration file (YAML); without it every default applies.
    #[arg(long, env = "LIQO_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Kubeconfig of the local cluster (overrides `kubeconfig` in the file).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This cluster's name (overrides `cluster.name`).
    #[arg(long)]
    cluster_name: Option<String>,
    /// Where /metrics, /healthz and /readyz are served (overrides `metricsAddr`).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Only validate the configuration (file and flags), print `ok` and exit.
    #[arg(long)]
    check: bool,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        "info,kube_runtime=warn,kube_client=warn,hyper=warn,rustls=warn".into()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn load(args: &Args) -> Result<config::Validated, config::ConfigError> {
    let (mut cfg, file) = match &args.config {
        Some(path) => (config::AgentConfig::load(path)?, path.clone()),
        None => (config::AgentConfig::default(), PathBuf::from("<flags>")),
    };
    if let Some(k) = &args.kubeconfig {
        cfg.kubeconfig = Some(k.clone());
    }
    if let Some(n) = &args.cluster_name {
        cfg.cluster.name = Some(n.clone());
    }
    if let Some(a) = args.metrics_addr {
        cfg.metrics_addr = Some(a);
    }
    cfg.validate(&file)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logs(args.log_format);
    let cfg = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("liqo-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("ok");
        return ExitCode::SUCCESS;
    }
    let agent = match compose::Agent::start(cfg).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "the agent could not start");
            eprintln!("liqo-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        cluster = %agent.cluster_id,
        metrics = %agent.metrics_addr,
        peering = ?agent.peering_addr,
        "agent started"
    );
    match agent.run(shutdown()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liqo-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
