//! `liqo-mdns`: advertise a cluster and/or browse for peers over mDNS, printing what happens as
//! JSON lines on stdout. A diagnostic tool; this crate's tests also run it inside network
//! namespaces as a peer.
//!
//! ```text
//! liqo-mdns --browse --interface eth0
//! liqo-mdns --advertise --id rome --endpoint https://10.0.0.1:8443 --fingerprint sha256:...
//! ```
//!
//! Every line is an object with `t_us` (wall-clock microseconds since the Unix epoch, to measure
//! latencies between processes) and `event`: `ready`, `advertised`, `added`, `updated` (with
//! `ad`), `expired` (with `clusterId`), `error` (with `message`) or `stopped`.
//!
//! Commands on stdin, one per line: `verify <cluster-id>`; `withdraw`; `quit`. End of input,
//! SIGTERM and SIGINT stop it gracefully (goodbye packets are sent).
#![forbid(unsafe_code)]

use std::{
    io::Write,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use futures::StreamExt;
use liqo_core::{
    ClusterId, Discovery, DiscoveryEvent, DiscoverySource, KeyFingerprint, PROTOCOL_VERSION,
    PeerAdvertisement,
};
use liqo_discovery_mdns::{Interface, MdnsConfig, MdnsDiscovery};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser, Debug)]
#[command(about = "Advertise and browse liqo clusters over mDNS, printing JSON lines")]
struct Args {
    /// Interface (name or address) to use; repeat for several. Default: all.
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    /// Service type.
    #[arg(long, default_value = liqo_discovery_mdns::DEFAULT_SERVICE_TYPE)]
    service_type: String,
    /// Browse for peers.
    #[arg(long)]
    browse: bool,
    /// Advertise this cluster (needs --id and --endpoint).
    #[arg(long, requires_all = ["id", "endpoint"])]
    advertise: bool,
    /// Cluster id to advertise.
    #[arg(long)]
    id: Option<ClusterId>,
    /// Cluster name to advertise (defaults to the id).
    #[arg(long)]
    name: Option<String>,
    /// Peering endpoint to advertise.
    #[arg(long)]
    endpoint: Option<String>,
    /// Key fingerprint to advertise.
    #[arg(long)]
    fingerprint: Option<KeyFingerprint>,
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn emit(mut v: Value) {
    v["t_us"] = json!(now_us());
    let mut out = std::io::stdout().lock();
    // A closed stdout means nobody listens any more; nothing better to do than stop writing.
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = MdnsConfig::default()
        .service_type(args.service_type.clone())
        .interfaces(args.interfaces.iter().map(|s| Interface::from(s.as_str())));
    let mdns = match MdnsDiscovery::new(config) {
        Ok(m) => m,
        Err(e) => {
            emit(json!({"event": "error", "message": e.to_string()}));
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut events = if args.browse {
        match mdns.watch().await {
            Ok(s) => Some(s),
            Err(e) => {
                emit(json!({"event": "error", "message": e.to_string()}));
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if args.advertise
        && let (Some(id), Some(endpoint)) = (&args.id, &args.endpoint)
    {
        let ad = PeerAdvertisement {
            cluster_id: id.clone(),
            cluster_name: args.name.clone().unwrap_or_else(|| id.to_string()),
            peering_endpoint: endpoint.clone(),
            key_fingerprint: args.fingerprint,
            protocol_version: PROTOCOL_VERSION,
            source: DiscoverySource::Mdns,
            ttl: None,
        };
        if let Err(e) = mdns.advertise(&ad).await {
            emit(json!({"event": "error", "message": e.to_string()}));
            return std::process::ExitCode::FAILURE;
        }
        emit(json!({"event": "advertised", "ad": ad}));
    }
    emit(json!({"event": "ready"}));

    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(e) => {
            emit(json!({"event": "error", "message": format!("SIGTERM handler: {e}")}));
            return std::process::ExitCode::FAILURE;
        }
    };
    loop {
        let next_event = async {
            match &mut events {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            line = stdin.next_line() => match line {
                Ok(Some(line)) => {
                    let mut words = line.split_whitespace();
                    match (words.next(), words.next()) {
                        (Some("verify"), Some(id)) => match id.parse::<ClusterId>() {
                            Ok(id) => {
                                if let Err(e) = mdns.verify(&id, Some(Duration::from_millis(500))) {
                                    emit(json!({"event": "error", "message": e.to_string()}));
                                }
                            }
                            Err(e) => emit(json!({"event": "error", "message": e.to_string()})),
                        },
                        (Some("withdraw"), None) => {
                            if let Err(e) = mdns.withdraw().await {
                                emit(json!({"event": "error", "message": e.to_string()}));
                            }
                            emit(json!({"event": "withdrawn"}));
                        }
                        (Some("quit"), None) => break,
                        _ => emit(json!({"event": "error", "message": format!("unknown command {line:?}")})),
                    }
                }
                // End of input: stop.
                Ok(None) | Err(_) => break,
            },
            item = next_event => match item {
                Some(Ok(DiscoveryEvent::Added(ad))) => emit(json!({"event": "added", "ad": ad})),
                Some(Ok(DiscoveryEvent::Updated(ad))) => emit(json!({"event": "updated", "ad": ad})),
                Some(Ok(DiscoveryEvent::Expired { cluster_id, .. })) => {
                    emit(json!({"event": "expired", "clusterId": cluster_id}))
                }
                Some(Err(e)) => emit(json!({"event": "error", "message": e.to_string()})),
                None => {
                    emit(json!({"event": "error", "message": "the browse ended"}));
                    events = None;
                }
            },
        }
    }
    // Goodbye packets, then the daemon stops.
    let _ = mdns.withdraw().await;
    drop(mdns);
    emit(json!({"event": "stopped"}));
    std::process::ExitCode::SUCCESS
}
