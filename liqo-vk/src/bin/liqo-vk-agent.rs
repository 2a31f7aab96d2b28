//! `liqo-vk-agent`: runs the consumer or provider side of liqo-vk as a process.
//!
//! ```text
//! liqo-vk-agent consumer --kubeconfig PATH --cluster-id ID [--webhook 127.0.0.1:PORT]
//!                        [--map PROVIDER=REAL_CIDR:LOCAL_CIDR]... [--heartbeat-ms N] [--pod-workers N]
//! liqo-vk-agent provider --kubeconfig PATH --cluster-id ID
//! ```
//!
//! The consumer runs pod offloading only (register more reflectors in an agent of your own, see
//! `liqo_vk::ConsumerAgent`); it stops on SIGINT or SIGTERM.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use liqo_core::{CidrMapping, ClusterId};
use liqo_vk::{
    ConsumerAgent, ConsumerConfig, PodReflector, ProviderAgent, StaticTranslation,
    reflection::EngineConfig,
};

struct Args {
    role: String,
    kubeconfig: String,
    cluster_id: ClusterId,
    webhook: Option<SocketAddr>,
    maps: Vec<(ClusterId, CidrMapping)>,
    heartbeat: Duration,
    pod_workers: usize,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let role = it
        .next()
        .ok_or("usage: liqo-vk-agent consumer|provider --kubeconfig PATH --cluster-id ID ...")?;
    let (mut kubeconfig, mut cluster_id, mut webhook, mut maps) = (None, None, None, vec![]);
    let (mut heartbeat, mut pod_workers) = (Duration::from_secs(10), 16);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--kubeconfig" => kubeconfig = Some(value()?),
            "--cluster-id" => {
                cluster_id = Some(value()?.parse::<ClusterId>().map_err(|e| e.to_string())?)
            }
            "--webhook" => {
                webhook = Some(
                    value()?
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--webhook: {e}"))?,
                )
            }
            "--heartbeat-ms" => {
                heartbeat = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|e| format!("--heartbeat-ms: {e}"))?,
                )
            }
            "--pod-workers" => {
                pod_workers = value()?
                    .parse()
                    .map_err(|e| format!("--pod-workers: {e}"))?
            }
            "--map" => {
                let v = value()?;
                let (p, cidrs) = v.split_once('=').ok_or("--map wants PROVIDER=REAL:LOCAL")?;
                let (real, local) = cidrs
                    .split_once(':')
                    .ok_or("--map wants PROVIDER=REAL:LOCAL")?;
                let m = CidrMapping::new(
                    real.parse().map_err(|e| format!("--map: {e}"))?,
                    local.parse().map_err(|e| format!("--map: {e}"))?,
                )
                .map_err(|e| e.to_string())?;
                maps.push((p.parse().map_err(|e| format!("--map: {e}"))?, m));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(Args {
        role,
        kubeconfig: kubeconfig.ok_or("--kubeconfig is required")?,
        cluster_id: cluster_id.ok_or("--cluster-id is required")?,
        webhook,
        maps,
        heartbeat,
        pod_workers,
    })
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(args: Args) -> Result<(), String> {
    let kc = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .map_err(|e| format!("{}: {e}", args.kubeconfig))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| format!("{}: {e}", args.kubeconfig))?;
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    match args.role.as_str() {
        "consumer" => {
            let mut translation = StaticTranslation::identity();
            for (p, m) in args.maps {
                translation = translation.with(p, vec![m]);
            }
            let config = ConsumerConfig {
                heartbeat: args.heartbeat,
                webhook: args.webhook,
                ..ConsumerConfig::default()
            };
            let pods = PodReflector::new(args.cluster_id.clone()).with_config(EngineConfig {
                workers: args.pod_workers,
                ..EngineConfig::default()
            });
            ConsumerAgent::builder(client, args.cluster_id)
                .translation(translation)
                .config(config)
                .pod_reflector(pods)
                .build()
                .run(shutdown())
                .await
                .map_err(|e| e.to_string())
        }
        "provider" => ProviderAgent::new(client, args.cluster_id)
            .run(shutdown())
            .await
            .map_err(|e| e.to_string()),
        other => Err(format!("unknown role {other:?} (consumer or provider)")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_vk=info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match parse() {
        Ok(args) => run(args).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liqo-vk-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
