//! A minimal gateway agent, used by the tests and the benchmark: it runs a
//! [`WireGuardFabric`] in the network namespace it is started in (`ip netns exec <ns> ...`),
//! as a real gateway runs in its pod's namespace.
//!
//! Modes:
//! - `gateway '<json config>'`: starts the fabric, then serves one JSON request per stdin line,
//!   answering one line `@reply {"ok":..}` / `@reply {"err":".."}` on stdout (other stdout
//!   lines may appear: wireguard-control prints unknown UAPI keys). Ops: `params`, `connect`,
//!   `set_local_mappings`, `status`, `disconnect`, `shutdown`.
//! - `device <implementation> <interface>`: only creates a userspace WireGuard interface and
//!   keeps it until stdin closes (for hand-configured tunnels).
//! - `echo-server <addr:port>`: answers each TCP line with `<peer ip> <line>`.
//! - `tcp-client <addr:port> <message>`: sends one line, prints the answer.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use liqo_core::{CidrMapping, ClusterId, NetworkFabric, NetworkParameters};
use liqo_fabric_wireguard::{FabricConfig, GatewayConfig, WireGuardBackend, WireGuardFabric};
use liqo_net::{
    IpamConfig,
    store::{FileStore, MemoryStore},
};
use liqo_wireguard_userspace::{Implementation, Userspace};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    implementation: String,
    interface: String,
    listen_port: u16,
    local: NetworkParameters,
    #[serde(default)]
    pools: Option<Vec<String>>,
    #[serde(default)]
    reserved: Vec<String>,
    #[serde(default)]
    private_key: Option<String>,
    /// Persistent keepalive in seconds; 0 turns it off; absent: the gateway's default.
    #[serde(default)]
    keepalive: Option<u16>,
    /// Seconds between checks that the gateway's state is intact; 0 turns them off; absent:
    /// the gateway's default.
    #[serde(default)]
    resync: Option<u64>,
    #[serde(default)]
    store_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Params,
    Connect {
        cluster: ClusterId,
        params: NetworkParameters,
    },
    SetLocalMappings {
        cluster: ClusterId,
        mappings: Vec<CidrMapping>,
    },
    Status {
        cluster: ClusterId,
    },
    Disconnect {
        cluster: ClusterId,
    },
    Shutdown,
}

fn reply(r: Result<Value, String>) {
    let v = match r {
        Ok(v) => json!({ "ok": v }),
        Err(e) => json!({ "err": e }),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@reply {v}");
    let _ = out.flush();
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

async fn serve<S: liqo_net::store::AllocationStore>(
    fabric: WireGuardFabric<Userspace, S>,
) -> Result<(), String> {
    reply(Ok(json!("started")));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(Err(format!("bad request: {e}")));
                continue;
            }
        };
        let r = match req {
            Request::Params => fabric
                .local_parameters()
                .await
                .map_err(|e| e.to_string())
                .and_then(to_value),
            Request::Connect { cluster, params } => fabric
                .connect(&cluster, &params)
                .await
                .map_err(|e| e.to_string())
                .and_then(to_value),
            Request::SetLocalMappings { cluster, mappings } => fabric
                .set_local_mappings(&cluster, mappings)
                .await
                .map_err(|e| e.to_string())
                .and_then(to_value),
            Request::Status { cluster } => fabric
                .status(&cluster)
                .await
                .map_err(|e| e.to_string())
                .and_then(to_value),
            Request::Disconnect { cluster } => fabric
                .disconnect(&cluster)
                .await
                .map_err(|e| e.to_string())
                .and_then(to_value),
            Request::Shutdown => break,
        };
        reply(r);
    }
    // stdin closed or shutdown asked: remove everything, as an agent does on uninstall.
    let r = fabric.shutdown().await.map_err(|e| e.to_string());
    reply(r.map(|()| json!("stopped")));
    Ok(())
}

async fn gateway(config: &str) -> Result<(), String> {
    let c: Config = serde_json::from_str(config).map_err(|e| format!("bad config: {e}"))?;
    let implementation = Implementation::from_name(&c.implementation).map_err(|e| e.to_string())?;
    let key = match &c.private_key {
        Some(k) => liqo_fabric_wireguard::parse_private_key(k).map_err(|e| e.to_string())?,
        None => liqo_fabric_wireguard::generate_private_key(),
    };
    let ipam = match &c.pools {
        Some(p) => IpamConfig::parse(p, &c.reserved),
        None => IpamConfig::parse(&liqo_net::ipam::DEFAULT_POOLS, &c.reserved),
    }
    .map_err(|e| e.to_string())?;
    let mut gw = GatewayConfig::new(&c.interface, c.listen_port);
    gw.persistent_keepalive = match c.keepalive {
        Some(0) => None,
        Some(k) => Some(k),
        None => gw.persistent_keepalive,
    };
    gw.resync = match c.resync {
        Some(0) => None,
        Some(s) => Some(std::time::Duration::from_secs(s)),
        None => gw.resync,
    };
    let config = FabricConfig {
        local: c.local,
        ipam,
        gateway: gw,
    };
    let backend = Userspace::new(implementation);
    match c.store_file {
        Some(f) => {
            serve(
                WireGuardFabric::start(backend, FileStore::new(f), config, key)
                    .await
                    .map_err(|e| e.to_string())?,
            )
            .await
        }
        None => {
            serve(
                WireGuardFabric::start(backend, MemoryStore::default(), config, key)
                    .await
                    .map_err(|e| e.to_string())?,
            )
            .await
        }
    }
}

async fn device(implementation: &str, iface: &str) -> Result<(), String> {
    let b = Userspace::new(Implementation::from_name(implementation).map_err(|e| e.to_string())?);
    b.create(iface).await.map_err(|e| e.to_string())?;
    reply(Ok(json!("started")));
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await
    .map_err(|e| e.to_string())?;
    b.remove(iface).await.map_err(|e| e.to_string())
}

fn echo_server(addr: &str) -> Result<(), String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
    println!("listening");
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        let peer = s
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let mut line = String::new();
        let Ok(clone) = s.try_clone() else { continue };
        if BufReader::new(clone).read_line(&mut line).is_ok() {
            let _ = writeln!(s, "{peer} {}", line.trim_end());
        }
    }
    Ok(())
}

fn tcp_client(addr: &str, msg: &str) -> Result<(), String> {
    let sa = addr.parse().map_err(|e| format!("address {addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(3))
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{msg}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading the answer: {e}"))?;
    print!("{line}");
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    };
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["gateway", config] => rt().and_then(|rt| rt.block_on(gateway(config))),
        ["device", implementation, iface] => rt().and_then(|rt| rt.block_on(device(implementation, iface))),
        ["echo-server", addr] => echo_server(addr),
        ["tcp-client", addr, msg] => tcp_client(addr, msg),
        _ => Err("usage: liqo-gateway-agent gateway <json> | device <impl> <iface> | echo-server <addr> | tcp-client <addr> <msg>".into()),
    };
    if let Err(e) = r {
        reply(Err(e.clone()));
        eprintln!("liqo-gateway-agent: {e}");
        std::process::exit(1);
    }
}
