//! An API client used from inside a gateway's network namespace: why it fails unpinned, and
//! that [`host_client`] (and so `NetworkConfigStore`) works from there. The API server is a
//! minimal HTTP responder on the host's loopback; the namespace is made by the test and
//! removed on drop. Needs root and `ip`.

use std::{net::SocketAddr, process::Command, time::Duration};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, api::ListParams};
use liqo_net::{
    Netns, host_client,
    store::{AllocationStore as _, NetworkConfigStore},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

struct NamedNetns(String);

impl NamedNetns {
    fn new(name: &str) -> Self {
        let ns = Self(name.to_owned());
        // A namespace left by an aborted earlier run of this test.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let ok = |args: &[&str]| {
            let s = Command::new("ip").args(args).status().expect("running ip");
            assert!(s.success(), "ip {args:?} failed");
        };
        ok(&["netns", "add", name]);
        // With loopback up, 127.0.0.1 answers there too: refused, as in the agent.
        ok(&["-n", name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Answers every request with an empty list, keeping connections open.
async fn fake_api_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = conn.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Requests here are bodiless GETs: one per blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = r#"{"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":"1"},"items":[]}"#;
                        let res = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(res.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn client(addr: SocketAddr) -> kube::Client {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_clients_connect_from_the_host_whatever_namespace_sends() {
    let addr = fake_api_server().await;
    let name = format!("lqhc{}", std::process::id() % 100_000);
    let ns = NamedNetns::new(&name);
    let netns = Netns::named(&ns.0).unwrap();
    let deadline = Duration::from_secs(30);

    // Unpinned, a first request sent from the namespace's thread connects from there: this
    // is the agent's "client error (Connect)" (no pooled connection to reuse).
    let plain = client(addr);
    let p = plain.clone();
    let e = tokio::time::timeout(
        deadline,
        netns.run(async move { Api::<ConfigMap>::all(p).list(&ListParams::default()).await }),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap_err();
    assert!(format!("{e:?}").contains("Connect"), "{e:?}");

    // Pinned: the same request from the same thread is sent from the host.
    let pinned = host_client(client(addr)).unwrap();
    let p = pinned.clone();
    let list = tokio::time::timeout(
        deadline,
        netns.run(async move { Api::<ConfigMap>::all(p).list(&ListParams::default()).await }),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert!(list.items.is_empty());

    // The store pins the client it is given: made on the host, it loads from the namespace.
    let store = NetworkConfigStore::new(client(addr), "liqo-system").unwrap();
    let loaded = tokio::time::timeout(deadline, netns.run(async move { store.load().await }))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(loaded.is_empty());

    // Made inside the namespace it would pin the wrong place: refused, saying why.
    let e = netns
        .run(async move { NetworkConfigStore::new(plain, "liqo-system").map(|_| ()) })
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(e.contains("process's network namespace"), "{e}");
    drop(netns);
    drop(ns);
}
