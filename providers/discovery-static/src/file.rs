//! [`FileDiscovery`]: peers listed in a file, watched for changes.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use liqo_core::{
    ClusterId, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource, DiscoveryStream,
    KeyFingerprint, PROTOCOL_VERSION, PeerAdvertisement,
};
use liqo_discovery::record::{MAX_NAME_BYTES, validate_endpoint};
use notify::{RecursiveMode, Watcher};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info};

/// The largest peers file read (1 MiB).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// How long to wait after a change for more changes (editors write in several steps).
const SETTLE: Duration = Duration::from_millis(50);

/// The peers file: `peers:`, a list of [`PeerEntry`]. Entries are kept raw here so that a bad
/// one is reported on its own instead of failing the whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    #[serde(default)]
    peers: Vec<serde_yaml_ng::Value>,
}

/// One declared peer, as written in the peers file (see the [crate documentation](crate)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerEntry {
    /// The peer's cluster id.
    pub cluster_id: String,
    /// Its name (defaults to the id).
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// Its peering endpoint, `https://host:port`.
    pub peering_endpoint: String,
    /// The fingerprint of its public key, `sha256:<hex>`.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
}

impl PeerEntry {
    fn validate(self) -> Result<PeerAdvertisement, String> {
        let cluster_id: ClusterId = self.cluster_id.parse().map_err(|e| format!("{e}"))?;
        let cluster_name = match self.cluster_name {
            Some(n) if n.len() > MAX_NAME_BYTES => {
                return Err(format!(
                    "clusterName is {} bytes; at most {MAX_NAME_BYTES}",
                    n.len()
                ));
            }
            Some(n) if n.chars().any(char::is_control) => {
                return Err("clusterName contains control characters".into());
            }
            Some(n) if !n.is_empty() => n,
            _ => cluster_id.to_string(),
        };
        validate_endpoint(&self.peering_endpoint).map_err(|e| format!("peeringEndpoint: {e}"))?;
        let key_fingerprint = self
            .key_fingerprint
            .map(|f| {
                f.parse::<KeyFingerprint>()
                    .map_err(|e| format!("keyFingerprint: {e}"))
            })
            .transpose()?;
        Ok(PeerAdvertisement {
            cluster_id,
            cluster_name,
            peering_endpoint: self.peering_endpoint,
            key_fingerprint,
            protocol_version: PROTOCOL_VERSION,
            source: DiscoverySource::Manual,
            ttl: None,
        })
    }
}

/// Parses a peers file. Returns the valid peers by cluster id, and one error per bad entry (the
/// entry's position and what is wrong); a file that is not a peers file at all is one error and
/// no peers.
pub fn parse_peers(
    origin: &str,
    text: &str,
) -> Result<(BTreeMap<ClusterId, PeerAdvertisement>, Vec<DiscoveryError>), DiscoveryError> {
    let file: PeersFile = if text.trim().is_empty() {
        PeersFile::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| DiscoveryError::MalformedRecord {
            origin: origin.to_owned(),
            reason: format!("not a peers file: {e}"),
        })?
    };
    let mut peers = BTreeMap::new();
    let mut errors = vec![];
    for (index, raw) in file.peers.into_iter().enumerate() {
        let bad = |reason: String| DiscoveryError::MalformedRecord {
            origin: format!("{origin} peers[{index}]"),
            reason,
        };
        let entry: PeerEntry = match serde_yaml_ng::from_value(raw) {
            Ok(e) => e,
            Err(e) => {
                errors.push(bad(e.to_string()));
                continue;
            }
        };
        match entry.validate() {
            Ok(ad) if peers.contains_key(&ad.cluster_id) => {
                errors.push(bad(format!("cluster {} is declared twice", ad.cluster_id)));
            }
            Ok(ad) => {
                peers.insert(ad.cluster_id.clone(), ad);
            }
            Err(reason) => errors.push(bad(reason)),
        }
    }
    Ok((peers, errors))
}

/// Peers declared in a YAML or JSON file, reloaded whenever the file changes (inotify on its
/// directory, so replacing the file by a rename, as editors and `kubectl`'s ConfigMap mounts do,
/// is seen too). A missing file means no peers until it appears.
#[derive(Debug, Clone)]
pub struct FileDiscovery {
    path: PathBuf,
}

impl FileDiscovery {
    /// Peers declared in the file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The watched file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn unavailable(path: &Path, message: impl std::fmt::Display) -> DiscoveryError {
    DiscoveryError::Unavailable {
        source_name: format!("peers file {}", path.display()),
        message: message.to_string(),
    }
}

struct Watch {
    path: PathBuf,
    peers: BTreeMap<ClusterId, PeerAdvertisement>,
    rx: mpsc::UnboundedReceiver<()>,
    // Dropping the watcher stops the inotify thread.
    _watcher: notify::RecommendedWatcher,
}

impl Watch {
    /// Reads the file and returns what changed since the last read.
    async fn reload(&mut self) -> Vec<Result<DiscoveryEvent, DiscoveryError>> {
        let origin = self.path.display().to_string();
        let (next, errors) = match read_limited(&self.path).await {
            Ok(Some(text)) => match parse_peers(&origin, &text) {
                Ok(r) => r,
                // Unparsable: keep the previous peers (a half-written file must not drop them).
                Err(e) => return vec![Err(e)],
            },
            Ok(None) => (BTreeMap::new(), vec![]),
            Err(e) => return vec![Err(e)],
        };
        let mut out: Vec<Result<DiscoveryEvent, DiscoveryError>> =
            errors.into_iter().map(Err).collect();
        for (id, old) in &self.peers {
            if !next.contains_key(id) {
                debug!(cluster = %id, file = %origin, "peer removed from the file");
                out.push(Ok(DiscoveryEvent::Expired {
                    cluster_id: old.cluster_id.clone(),
                    source: DiscoverySource::Manual,
                }));
            }
        }
        for (id, ad) in &next {
            match self.peers.get(id) {
                None => out.push(Ok(DiscoveryEvent::Added(ad.clone()))),
                Some(old) if old != ad => out.push(Ok(DiscoveryEvent::Updated(ad.clone()))),
                Some(_) => {}
            }
        }
        self.peers = next;
        out
    }
}

/// Reads the file, refusing one over [`MAX_FILE_BYTES`]; `None` when it does not exist.
async fn read_limited(path: &Path) -> Result<Option<String>, DiscoveryError> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            return Err(unavailable(
                path,
                format!("{} bytes; at most {MAX_FILE_BYTES} are read", m.len()),
            ));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unavailable(path, e)),
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| unavailable(path, "not UTF-8")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(unavailable(path, e)),
    }
}

#[async_trait]
impl Discovery for FileDiscovery {
    fn source(&self) -> DiscoverySource {
        DiscoverySource::Manual
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self
            .path
            .file_name()
            .ok_or_else(|| unavailable(&self.path, "not a file path"))?
            .to_owned();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Any change in the directory that touches our file (or an error) means: reload.
            let ours = match &res {
                Ok(ev) => ev.paths.iter().any(|p| p.file_name() == Some(&file_name)),
                Err(_) => true,
            };
            if ours {
                let _ = tx.send(());
            }
        })
        .map_err(|e| unavailable(&self.path, format!("cannot watch: {e}")))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| unavailable(&self.path, format!("cannot watch {}: {e}", dir.display())))?;
        let mut state = Watch {
            path: self.path.clone(),
            peers: BTreeMap::new(),
            rx,
            _watcher: watcher,
        };
        info!(file = %self.path.display(), "watching the peers file");
        let first = state.reload().await;
        let later = futures::stream::unfold(state, |mut state| async move {
            loop {
                state.rx.recv().await?;
                // Let a burst of writes settle, then read once.
                tokio::time::sleep(SETTLE).await;
                while state.rx.try_recv().is_ok() {}
                let items = state.reload().await;
                if !items.is_empty() {
                    return Some((futures::stream::iter(items), state));
                }
            }
        })
        .flatten();
        Ok(futures::stream::iter(first).chain(later).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parses_good_entries_and_names_bad_ones() {
        let text = format!(
            "peers:\n\
             - clusterId: rome\n  clusterName: Rome\n  peeringEndpoint: https://rome:8443\n  keyFingerprint: {FP}\n\
             - clusterId: Bad_Id\n  peeringEndpoint: https://x:1\n\
             - clusterId: milan\n  peeringEndpoint: http://milan:1\n\
             - clusterId: turin\n  peeringEndpoint: https://turin:1\n  colour: blue\n\
             - clusterId: rome\n  peeringEndpoint: https://rome2:1\n\
             - clusterId: naples\n  peeringEndpoint: https://naples:1\n  keyFingerprint: md5:00\n\
             - clusterId: genoa\n  peeringEndpoint: https://genoa:1\n"
        );
        let (peers, errors) = parse_peers("f", &text).unwrap();
        let ids: Vec<_> = peers.keys().map(ClusterId::as_str).collect();
        assert_eq!(ids, ["genoa", "rome"]);
        assert_eq!(peers[&"rome".parse().unwrap()].cluster_name, "Rome");
        assert_eq!(peers[&"genoa".parse().unwrap()].cluster_name, "genoa");
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let want = [
            ("peers[1]", "cluster id"),
            ("peers[2]", "https"),
            ("peers[3]", "colour"),
            ("peers[4]", "declared twice"),
            ("peers[5]", "keyFingerprint"),
        ];
        assert_eq!(errors.len(), want.len(), "{errors:#?}");
        for ((at, what), e) in want.iter().zip(&errors) {
            assert!(
                e.contains(at) && e.contains(what),
                "{e} lacks {at} / {what}"
            );
        }
    }

    #[test]
    fn json_and_empty_files() {
        let (peers, errors) = parse_peers(
            "f",
            r#"{"peers":[{"clusterId":"a","peeringEndpoint":"https://a:1"}]}"#,
        )
        .unwrap();
        assert_eq!(peers.len(), 1);
        assert!(errors.is_empty());
        assert!(parse_peers("f", "").unwrap().0.is_empty());
        assert!(parse_peers("f", "peers: 3").is_err());
        assert!(parse_peers("f", "[unclosed").is_err());
    }
}
