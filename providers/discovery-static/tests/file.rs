//! FileDiscovery against a real file and inotify: edits, replacement by rename, bad content,
//! deletion.

use std::{path::PathBuf, time::Duration};

use futures::StreamExt;
use liqo_core::{Discovery, DiscoveryError, DiscoveryEvent, DiscoveryStream};
use liqo_discovery_static::FileDiscovery;
use tokio::time::timeout;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "liqo-discovery-static-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn show(item: Result<DiscoveryEvent, DiscoveryError>) -> String {
    match item {
        Ok(DiscoveryEvent::Added(a)) => format!("added {} {}", a.cluster_id, a.peering_endpoint),
        Ok(DiscoveryEvent::Updated(a)) => {
            format!("updated {} {}", a.cluster_id, a.peering_endpoint)
        }
        Ok(DiscoveryEvent::Expired { cluster_id, .. }) => format!("expired {cluster_id}"),
        Err(e) => format!("error {e}"),
    }
}

async fn next(s: &mut DiscoveryStream) -> String {
    show(
        timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on"),
    )
}

fn peers(entries: &[(&str, &str)]) -> String {
    let mut s = String::from("peers:\n");
    for (id, ep) in entries {
        s.push_str(&format!("  - clusterId: {id}\n    peeringEndpoint: {ep}\n"));
    }
    s
}

#[tokio::test]
async fn follows_the_file() {
    let dir = TempDir::new();
    let path = dir.0.join("peers.yaml");
    // Missing at first: no peers, and the source waits for it.
    let source = FileDiscovery::new(&path);
    let mut s = source.watch().await.unwrap();

    std::fs::write(
        &path,
        peers(&[("rome", "https://rome:1"), ("milan", "https://milan:1")]),
    )
    .unwrap();
    let mut got = vec![next(&mut s).await, next(&mut s).await];
    got.sort();
    assert_eq!(
        got,
        ["added milan https://milan:1", "added rome https://rome:1"]
    );

    // An in-place edit: one changed, one removed, one added.
    std::fs::write(
        &path,
        peers(&[("rome", "https://rome:2"), ("turin", "https://turin:1")]),
    )
    .unwrap();
    let mut got = vec![next(&mut s).await, next(&mut s).await, next(&mut s).await];
    got.sort();
    assert_eq!(
        got,
        [
            "added turin https://turin:1",
            "expired milan",
            "updated rome https://rome:2"
        ]
    );

    // Garbage: reported, and the peers stay.
    std::fs::write(&path, "peers: [unclosed").unwrap();
    let e = next(&mut s).await;
    assert!(
        e.starts_with("error") && e.contains("not a peers file"),
        "{e}"
    );

    // Replaced by a rename (how editors and ConfigMap mounts update files), with one bad entry.
    let tmp = dir.0.join(".peers.yaml.tmp");
    std::fs::write(
        &tmp,
        peers(&[("rome", "https://rome:2"), ("turin", "http://turin:1")]),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut got = vec![next(&mut s).await, next(&mut s).await];
    got.sort();
    assert!(
        got[0].starts_with("error") && got[0].contains("peers[1]"),
        "{got:?}"
    );
    assert_eq!(got[1], "expired turin");

    // Deleted: every peer goes.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(next(&mut s).await, "expired rome");
}

#[tokio::test]
async fn oversized_file_is_refused() {
    let dir = TempDir::new();
    let path = dir.0.join("peers.yaml");
    std::fs::write(&path, "#".repeat(2 << 20)).unwrap();
    let mut s = FileDiscovery::new(&path).watch().await.unwrap();
    let e = next(&mut s).await;
    assert!(e.contains("at most"), "{e}");
}
