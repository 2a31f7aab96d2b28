//! Test providers, for unit tests of code built on liqo-core. They keep state in memory and
//! record every call; none of them talks to a network or a cluster. Enabled by the `testing`
//! feature. Real providers live in the `providers/` crates.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    CidrMapping, ClusterId, ClusterIdentity, Credential, Discovery, DiscoveryError, DiscoveryEvent,
    DiscoverySource, DiscoveryStream, FabricError, LinkState, LinkStatus, NetworkFabric,
    NetworkParameters, PeerAdvertisement, PeerLink, PeeringAuthority, PeeringError, PeeringGrant,
    PeeringTarget, ReflectionDirection, ReflectionError, ReflectionScope, ResourceOffer,
    ResourceReflector,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test provider's state stays usable even if a test thread panicked holding it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A discovery source fed by the test: initial events, then whatever is sent through
/// [`StaticDiscovery::sender`].
#[derive(Debug)]
pub struct StaticDiscovery {
    source: DiscoverySource,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Result<DiscoveryEvent, DiscoveryError>>>>,
    tx: mpsc::UnboundedSender<Result<DiscoveryEvent, DiscoveryError>>,
    advertised: Arc<Mutex<Vec<PeerAdvertisement>>>,
}

impl StaticDiscovery {
    /// A `Manual` source that first reports `initial` as added.
    pub fn new(initial: Vec<PeerAdvertisement>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        for ad in initial {
            let _ = tx.send(Ok(DiscoveryEvent::Added(ad)));
        }
        Self {
            source: DiscoverySource::Manual,
            rx: Mutex::new(Some(rx)),
            tx,
            advertised: Arc::default(),
        }
    }

    /// Reports itself as `source` instead of `Manual`.
    pub fn with_source(mut self, source: DiscoverySource) -> Self {
        self.source = source;
        self
    }

    /// Sends more events (or errors) into the stream.
    pub fn sender(&self) -> mpsc::UnboundedSender<Result<DiscoveryEvent, DiscoveryError>> {
        self.tx.clone()
    }

    /// What the runtime asked to advertise.
    pub fn advertised(&self) -> Arc<Mutex<Vec<PeerAdvertisement>>> {
        self.advertised.clone()
    }
}

#[async_trait]
impl Discovery for StaticDiscovery {
    fn source(&self) -> DiscoverySource {
        self.source
    }

    async fn advertise(&self, me: &PeerAdvertisement) -> Result<(), DiscoveryError> {
        lock(&self.advertised).push(me.clone());
        Ok(())
    }

    async fn watch(&self) -> Result<DiscoveryStream, DiscoveryError> {
        let rx = lock(&self.rx)
            .take()
            .ok_or_else(|| DiscoveryError::Unavailable {
                source_name: "static".into(),
                message: "watch() may be called once".into(),
            })?;
        Ok(tokio_stream_from(rx))
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> futures::stream::BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

/// Builds an advertisement for tests.
pub fn advertisement(id: &str, source: DiscoverySource) -> PeerAdvertisement {
    PeerAdvertisement {
        cluster_id: id.parse().expect("test cluster id must be valid"),
        cluster_name: id.to_uppercase(),
        peering_endpoint: format!("https://{id}.example:6443"),
        key_fingerprint: None,
        protocol_version: crate::PROTOCOL_VERSION,
        source,
        ttl: Some(Duration::from_secs(60)),
    }
}

/// A calls log shared between a test provider and the test.
pub type CallLog = Arc<Mutex<Vec<String>>>;

/// A peering authority that grants everything (as consumer and as provider) and records calls.
/// Its credentials point at `server` (by default an unroutable address), so clients can be built
/// but not used.
#[derive(Debug, Clone)]
pub struct TestPeering {
    server: String,
    calls: CallLog,
    fail_request: Arc<Mutex<Option<String>>>,
    answer_as: Arc<Mutex<Option<ClusterId>>>,
}

impl Default for TestPeering {
    fn default() -> Self {
        Self {
            server: "https://127.0.0.1:1".into(),
            calls: CallLog::default(),
            fail_request: Arc::default(),
            answer_as: Arc::default(),
        }
    }
}

impl TestPeering {
    /// The calls made so far, e.g. `request:rome`, `release:rome`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// Makes every `request` fail with `Refused` and this reason.
    pub fn fail_requests(&self, reason: &str) {
        *lock(&self.fail_request) = Some(reason.to_owned());
    }

    /// Makes grants claim to come from `id`, whatever was asked (to test identity checks).
    pub fn answer_as(&self, id: &str) {
        *lock(&self.answer_as) = Some(id.parse().expect("test cluster id must be valid"));
    }

    fn kubeconfig(&self, ns: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: p\n  cluster:\n    server: {}\n    insecure-skip-tls-verify: true\ncontexts:\n- name: p\n  context:\n    cluster: p\n    user: u\n    namespace: {ns}\ncurrent-context: p\nusers:\n- name: u\n  user:\n    token: test\n",
            self.server
        )
    }

    fn grant_for(&self, provider: ClusterId, consumer: &str) -> PeeringGrant {
        let ns = format!("liqo-tenant-{consumer}");
        PeeringGrant {
            provider: ClusterIdentity::new(provider, "test provider"),
            credential: Credential {
                kubeconfig: self.kubeconfig(&ns),
                tenant_namespace: ns,
                expires_at: None,
            },
            offer: ResourceOffer::new("4", "8Gi", 110),
            network: NetworkParameters::new(
                "10.244.0.0/16".parse().expect("valid"),
                "10.96.0.0/12".parse().expect("valid"),
            ),
        }
    }
}

#[async_trait]
impl PeeringAuthority for TestPeering {
    async fn request(&self, target: &PeeringTarget) -> Result<PeeringGrant, PeeringError> {
        let id = match (&*lock(&self.answer_as), &target.cluster_id) {
            (Some(forced), _) => forced.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => "anonymous".parse().expect("valid"),
        };
        lock(&self.calls).push(format!("request:{id}"));
        if let Some(reason) = lock(&self.fail_request).clone() {
            return Err(PeeringError::Refused {
                cluster: id,
                reason,
            });
        }
        Ok(self.grant_for(id, "me"))
    }

    async fn release(&self, provider: &ClusterId) -> Result<(), PeeringError> {
        lock(&self.calls).push(format!("release:{provider}"));
        Ok(())
    }
}

/// A fabric that maps every remote CIDR to itself and records connects and disconnects.
#[derive(Debug, Clone, Default)]
pub struct IdentityFabric {
    links: Arc<Mutex<BTreeMap<ClusterId, PeerLink>>>,
    calls: CallLog,
    fail_connect: Arc<Mutex<Option<String>>>,
}

impl IdentityFabric {
    /// The calls made so far, e.g. `connect:rome`.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// The clusters currently linked.
    pub fn linked(&self) -> Vec<ClusterId> {
        lock(&self.links).keys().cloned().collect()
    }

    /// Makes every `connect` fail with this message.
    pub fn fail_connects(&self, message: &str) {
        *lock(&self.fail_connect) = Some(message.to_owned());
    }
}

#[async_trait]
impl NetworkFabric for IdentityFabric {
    async fn local_parameters(&self) -> Result<NetworkParameters, FabricError> {
        Ok(NetworkParameters::new(
            "10.244.0.0/16".parse().expect("valid"),
            "10.96.0.0/12".parse().expect("valid"),
        ))
    }

    async fn connect(
        &self,
        remote: &ClusterId,
        p: &NetworkParameters,
    ) -> Result<PeerLink, FabricError> {
        lock(&self.calls).push(format!("connect:{remote}"));
        if let Some(m) = lock(&self.fail_connect).clone() {
            return Err(FabricError::Backend {
                backend: "identity".into(),
                message: m,
            });
        }
        let mut mappings = vec![CidrMapping::identity(p.pod_cidr)];
        mappings.extend(p.external_cidr.map(CidrMapping::identity));
        let link = PeerLink {
            cluster: remote.clone(),
            remote_mappings: mappings,
            local_mappings: vec![],
        };
        lock(&self.links).insert(remote.clone(), link.clone());
        Ok(link)
    }

    async fn disconnect(&self, remote: &ClusterId) -> Result<(), FabricError> {
        lock(&self.calls).push(format!("disconnect:{remote}"));
        lock(&self.links).remove(remote);
        Ok(())
    }

    async fn status(&self, remote: &ClusterId) -> Result<LinkStatus, FabricError> {
        if !lock(&self.links).contains_key(remote) {
            return Err(FabricError::NotConnected(remote.clone()));
        }
        Ok(LinkStatus {
            state: LinkState::Connected,
            latest_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            message: "identity fabric (test provider)".into(),
        })
    }
}

/// A reflector that touches no API: it records each scope it runs for, can fail its first
/// runs, and waits for shutdown.
#[derive(Debug, Clone)]
pub struct RecordingReflector {
    kind: String,
    runs: CallLog,
    failures_left: Arc<Mutex<u32>>,
}

impl RecordingReflector {
    /// A reflector reporting `kind`.
    pub fn new(kind: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            runs: CallLog::default(),
            failures_left: Arc::default(),
        }
    }

    /// Fails the first `n` runs.
    pub fn failing_first(self, n: u32) -> Self {
        *lock(&self.failures_left) = n;
        self
    }

    /// `run:<cluster>:<local ns>:<remote ns>`, `stop:...` and `cleanup:...` entries.
    pub fn log(&self) -> Vec<String> {
        lock(&self.runs).clone()
    }
}

#[async_trait]
impl ResourceReflector for RecordingReflector {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }

    async fn reflect(
        &self,
        s: ReflectionScope,
        shutdown: CancellationToken,
    ) -> Result<(), ReflectionError> {
        let tag = format!(
            "{}:{}:{}",
            s.remote_cluster, s.local_namespace, s.remote_namespace
        );
        lock(&self.runs).push(format!("run:{tag}"));
        {
            let mut left = lock(&self.failures_left);
            if *left > 0 {
                *left -= 1;
                return Err(ReflectionError::Watch {
                    kind: self.kind.clone(),
                    message: "injected failure".into(),
                });
            }
        }
        shutdown.cancelled().await;
        lock(&self.runs).push(format!("stop:{tag}"));
        Ok(())
    }

    async fn cleanup(&self, s: &ReflectionScope) -> Result<(), ReflectionError> {
        lock(&self.runs).push(format!(
            "cleanup:{}:{}:{}",
            s.remote_cluster, s.local_namespace, s.remote_namespace
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClusterId {
        s.parse().expect("a test id")
    }

    #[tokio::test]
    async fn static_discovery_streams_what_it_is_given_once() {
        let d = StaticDiscovery::new(vec![advertisement("rome", DiscoverySource::Manual)]);
        d.advertise(&advertisement("me", DiscoverySource::Manual))
            .await
            .expect("advertise");
        assert_eq!(d.advertised().lock().expect("lock").len(), 1);
        let mut events = d.watch().await.expect("the first watch");
        d.sender()
            .send(Ok(DiscoveryEvent::Added(advertisement(
                "milan",
                DiscoverySource::Dns,
            ))))
            .expect("send");
        for want in ["rome", "milan"] {
            match events.next().await {
                Some(Ok(DiscoveryEvent::Added(a))) => assert_eq!(a.cluster_id.as_str(), want),
                other => panic!("expected {want} added, got {other:?}"),
            }
        }
        assert!(d.watch().await.is_err(), "a second watch is refused");
    }

    #[tokio::test]
    async fn test_peering_records_and_fails_on_demand() {
        let p = TestPeering::default();
        let target = PeeringTarget {
            cluster_id: Some(id("milan")),
            endpoint: "https://milan:1".into(),
            expected_fingerprint: None,
        };
        let grant = p.request(&target).await.expect("a grant");
        assert_eq!(grant.provider.id, id("milan"));
        assert_eq!(grant.credential.tenant_namespace, "liqo-tenant-me");
        p.answer_as("turin");
        assert_eq!(
            p.request(&target).await.expect("a grant").provider.id,
            id("turin")
        );
        p.fail_requests("no");
        assert!(matches!(
            p.request(&target).await,
            Err(PeeringError::Refused { reason, .. }) if reason == "no"
        ));
        p.release(&id("milan")).await.expect("release");
        assert_eq!(
            p.calls(),
            [
                "request:milan",
                "request:turin",
                "request:turin",
                "release:milan"
            ]
        );
    }

    #[tokio::test]
    async fn identity_fabric_links_and_fails_on_demand() {
        let f = IdentityFabric::default();
        let params = f.local_parameters().await.expect("parameters");
        let link = f.connect(&id("milan"), &params).await.expect("a link");
        assert_eq!(link.cluster, id("milan"));
        assert_eq!(f.linked(), [id("milan")]);
        assert_eq!(
            f.status(&id("milan")).await.expect("status").state,
            LinkState::Connected
        );
        f.disconnect(&id("milan")).await.expect("disconnect");
        assert!(f.linked().is_empty());
        f.fail_connects("cable cut");
        let err = f.connect(&id("turin"), &params).await.expect_err("fails");
        assert!(err.to_string().contains("cable cut"), "{err}");
    }
}
