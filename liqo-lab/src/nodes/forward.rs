//! The two ways between the lab's own network namespace and its real nodes, without giving the
//! host namespace an interface on the nodes' network:
//! - TCP forwarding from addresses inside the nodes' namespace to the API servers, which listen on
//!   the host's loopback (how kubelets, kube-proxies and pods reach them);
//! - an HTTP CONNECT proxy on a unix socket per cluster, the API server's egress selector for
//!   `cluster` traffic (kubelets for logs and exec, pods, webhooks), which dials from inside one of
//!   the cluster's nodes, so overlapping pod CIDRs of different clusters never meet.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use tokio_util::sync::CancellationToken;

use crate::{
    dataplane::in_netns,
    error::{LabError, Result},
};

/// One forwarded address: connections accepted on `listen` (inside the namespace) are joined to
/// `target` (in the namespace of the lab's process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub(crate) listen: SocketAddr,
    pub(crate) target: SocketAddr,
}

/// One cluster's egress proxy: an HTTP CONNECT proxy listening on `socket`, dialing loopback
/// targets from the lab's namespace and every other target from the namespace at `dial_netns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Egress {
    pub(crate) socket: PathBuf,
    pub(crate) dial_netns: PathBuf,
}

/// How long the egress proxy waits for a connection to a node or pod.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards [`Route`]s and serves [`Egress`] proxies on a thread of its own with its own runtime, so it does not depend on the
/// runtime of whoever started it (a lab shared by many tests outlives each test's runtime).
/// Dropping it stops the forwarding and closes every forwarded connection.
#[derive(Debug)]
pub(crate) struct Forwarder {
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Binds every route's `listen` address inside the network namespace at `netns` and starts
    /// forwarding.
    pub(crate) async fn start(
        netns: &Path,
        routes: Vec<Route>,
        egress: Vec<Egress>,
    ) -> Result<Self> {
        let addrs: Vec<SocketAddr> = routes.iter().map(|r| r.listen).collect();
        let listeners = in_netns(netns, move || {
            addrs
                .iter()
                .map(|a| {
                    let l = std::net::TcpListener::bind(a)
                        .map_err(|e| std::io::Error::new(e.kind(), format!("binding {a}: {e}")))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| LabError::Nodes(format!("API forwarder in {}: {e}", netns.display())))?;
        let mut unix = Vec::new();
        for e in &egress {
            let _ = std::fs::remove_file(&e.socket);
            let l = std::os::unix::net::UnixListener::bind(&e.socket)
                .map_err(|err| LabError::io("binding the egress proxy socket", &e.socket, err))?;
            l.set_nonblocking(true)
                .map_err(|err| LabError::io("configuring", &e.socket, err))?;
            unix.push(l);
        }
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("liqo-lab-forward".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("API forwarder: cannot build its runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let proxies = serve_egress(unix, egress, token.clone());
                    tokio::join!(serve(listeners, routes, token), proxies);
                });
            })
            .map_err(|e| LabError::Nodes(format!("starting the API forwarder thread: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listeners: Vec<std::net::TcpListener>, routes: Vec<Route>, stop: CancellationToken) {
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, route) in listeners.into_iter().zip(routes) {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listen = %route.listen, "API forwarder: {e}");
                continue;
            }
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((mut inbound, _)) => {
                        conns.spawn(async move {
                            match tokio::net::TcpStream::connect(route.target).await {
                                Ok(mut outbound) => {
                                    let _ =
                                        tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                            .await;
                                }
                                Err(e) => {
                                    tracing::debug!(target = %route.target, "API forwarder: {e}")
                                }
                            }
                        });
                    }
                    Err(e) => tracing::debug!(listen = %route.listen, "API forwarder accept: {e}"),
                }
                // Reap finished connections so the set does not grow without bound.
                while conns.try_join_next().is_some() {}
            }
            // Dropping the set aborts the open connections.
        });
    }
    stop.cancelled().await;
    tasks.shutdown().await;
}

async fn serve_egress(
    listeners: Vec<std::os::unix::net::UnixListener>,
    egress: Vec<Egress>,
    stop: CancellationToken,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, e) in listeners.into_iter().zip(egress) {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(err) => {
                tracing::error!(socket = %e.socket.display(), "egress proxy: {err}");
                continue;
            }
        };
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => break,
                    a = listener.accept() => a,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let netns = e.dial_netns.clone();
                        conns.spawn(async move {
                            if let Err(err) = connect_one(stream, &netns).await {
                                tracing::debug!("egress proxy: {err}");
                            }
                        });
                    }
                    Err(err) => tracing::debug!("egress proxy accept: {err}"),
                }
                while conns.try_join_next().is_some() {}
            }
        });
    }
    stop.cancelled().await;
    tasks.shutdown().await;
}

/// The target of an HTTP CONNECT request line (`CONNECT host:port HTTP/1.1`).
pub(crate) fn connect_target(line: &str) -> std::result::Result<SocketAddr, String> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("CONNECT"), Some(authority)) => authority
            .parse::<SocketAddr>()
            .map_err(|_| format!("CONNECT target {authority:?} is not an IP address and port")),
        _ => Err(format!("not a CONNECT request: {:?}", line.trim())),
    }
}

async fn connect_one(stream: tokio::net::UnixStream, netns: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    reader.read_line(&mut request).await?;
    // The headers end with an empty line; nothing in them changes where to dial.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let target = match connect_target(&request) {
        Ok(t) => t,
        Err(msg) => {
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                .await?;
            return Err(std::io::Error::other(msg));
        }
    };
    let dialed = match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(target))
                .await
                .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
        }
        _ => {
            let netns = netns.to_owned();
            in_netns(&netns, move || {
                let s = std::net::TcpStream::connect_timeout(&target, DIAL_TIMEOUT)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .await
            .and_then(tokio::net::TcpStream::from_std)
        }
    };
    let mut outbound = match dialed {
        Ok(s) => s,
        Err(e) => {
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                .await?;
            return Err(std::io::Error::new(
                e.kind(),
                format!("dialing {target}: {e}"),
            ));
        }
    };
    reader
        .get_mut()
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    // Bytes the client sent right after its request are in the reader's buffer: send them first.
    let buffered = reader.buffer().to_vec();
    if !buffered.is_empty() {
        outbound.write_all(&buffered).await?;
    }
    let mut inbound = reader.into_inner();
    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_connect_targets() {
        assert_eq!(
            connect_target("CONNECT 172.30.1.2:10250 HTTP/1.1\r\n"),
            Ok("172.30.1.2:10250".parse().expect("addr"))
        );
        assert!(connect_target("GET / HTTP/1.1").is_err());
        assert!(connect_target("CONNECT node-1:10250 HTTP/1.1").is_err());
        assert!(connect_target("").is_err());
    }
}
