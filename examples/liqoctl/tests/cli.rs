//! liqoctl against a real lab of two clusters (`a` is the local cluster, `b` a would-be
//! provider), shared by every test of this binary. The binary itself is run, as a user would.
//!
//! Tests run in parallel on the same clusters, so each uses cluster ids and namespaces of its own.

mod common;

use common::{cluster, id, liqoctl, run_bin};

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Node, Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use liqo_core::{
    DiscoverySource, NetworkParameters, PublicKey,
    crds::{
        DiscoverySpec, ForeignCluster, ForeignClusterSpec, NamespaceMappingStrategy,
        NamespaceOffloading, PeeringRole, PodOffloadingStrategy, ResourceOffer, ResourceOfferSpec,
        Tunnel,
    },
};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_peering_csr::{
    ApiEndpoint, Consumer, HttpsConnector, LocalIdentity, NetworkSource, OfferPolicy,
    PeeringServer, Provider, ProviderConfig,
};
use liqo_vk::{ConsumerAgent, ConsumerConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

async fn lab() -> &'static Lab {
    liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("a"), ClusterSpec::new("b")]))
        .await
        .unwrap_or_else(|e| panic!("the shared lab did not start: {e}"))
}

/// The local cluster `a` with the liqo CRDs installed.
async fn local() -> Result<(&'static Cluster, Client), Box<dyn std::error::Error + Send + Sync>> {
    let a = cluster(lab().await, "a");
    let client = a.client()?;
    install_crds(&client).await?;
    Ok((a, client))
}

async fn install_crds(client: &Client) -> TestResult {
    Ok(liqo_core::crds::install(client, &[], "liqoctl-test").await?)
}

fn fingerprint(seed: u8) -> liqo_core::KeyFingerprint {
    PublicKey::from_bytes(vec![seed; 32]).fingerprint()
}

/// Makes (or replaces) a ForeignCluster and sets its conditions.
async fn foreign_cluster(
    client: &Client,
    name: &str,
    source: DiscoverySource,
    role: PeeringRole,
    true_conditions: &[&str],
) -> TestResult {
    let mut fc = ForeignCluster::new(
        name,
        ForeignClusterSpec {
            cluster_id: id(name),
            cluster_name: Some(format!("Cluster {name}")),
            peering_endpoint: Some(format!("https://{name}.example:8443")),
            public_key_fingerprint: Some(fingerprint(name.len() as u8)),
            discovery: DiscoverySpec {
                source,
                auto_peer: false,
            },
            role,
        },
    );
    fc.metadata.managed_fields = None;
    let api: Api<ForeignCluster> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::apply("liqoctl-test").force(),
        &Patch::Apply(&fc),
    )
    .await?;
    let conds: Vec<Condition> = true_conditions
        .iter()
        .map(|t| Condition {
            type_: (*t).into(),
            status: "True".into(),
            reason: "Test".into(),
            message: format!("{t} set by the test"),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        })
        .collect();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"conditions": conds, "lastSeen": Timestamp::now().to_string()}}),
        ),
    )
    .await?;
    Ok(())
}

async fn namespace(client: &Client, name: &str) -> TestResult {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn by_id<'a>(list: &'a Value, id: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|v| v["clusterId"] == json!(id))
}

/// `discover` and `info` in every output format; JSON and YAML parse and carry the fields.
#[tokio::test]
async fn discover_and_info_print_table_json_and_yaml() -> TestResult {
    let (a, client) = local().await?;
    foreign_cluster(
        &client,
        "cli-disc-peer",
        DiscoverySource::Manual,
        PeeringRole::Provider,
        &["Authenticated", "OfferAccepted"],
    )
    .await?;
    foreign_cluster(
        &client,
        "cli-disc-found",
        DiscoverySource::Dns,
        PeeringRole::None,
        &["Discovered"],
    )
    .await?;
    // The consumer's copy of the provider's offer, where the agent keeps it.
    namespace(&client, "liqo-tenant-cli-disc-peer").await?;
    let offer = ResourceOffer::new(
        "cli-disc-peer",
        ResourceOfferSpec {
            provider_cluster_id: id("cli-disc-peer"),
            consumer_cluster_id: id("a"),
            resources: liqo_core::ResourceOffer::new("2", "4Gi", 10),
            cordoned: false,
        },
    );
    Api::<ResourceOffer>::namespaced(client.clone(), "liqo-tenant-cli-disc-peer")
        .patch(
            "cli-disc-peer",
            &PatchParams::apply("liqoctl-test").force(),
            &Patch::Apply(&offer),
        )
        .await?;

    let json_run = liqoctl(a, &["discover", "-o", "json"]).await;
    assert_eq!(json_run.code, 0, "{json_run:?}");
    let list: Value = serde_json::from_str(&json_run.stdout)?;
    let found = by_id(&list, "cli-disc-found").ok_or("cli-disc-found not listed")?;
    assert_eq!(found["source"], "DNS", "{found}");
    assert_eq!(found["role"], "None");
    assert_eq!(
        found["peeringEndpoint"],
        "https://cli-disc-found.example:8443"
    );
    assert_eq!(
        found["publicKeyFingerprint"],
        json!(fingerprint("cli-disc-found".len() as u8).to_string())
    );
    assert_eq!(found["discovered"]["status"], "True");
    assert!(found["lastSeen"].is_string(), "{found}");
    let peer = by_id(&list, "cli-disc-peer").ok_or("cli-disc-peer not listed")?;
    assert_eq!(
        (peer["source"].as_str(), peer["role"].as_str()),
        (Some("Manual"), Some("Provider"))
    );

    let yaml_run = liqoctl(a, &["discover", "-o", "yaml"]).await;
    assert_eq!(yaml_run.code, 0, "{yaml_run:?}");
    let from_yaml: Value = serde_yaml_ng::from_str(&yaml_run.stdout)?;
    assert_eq!(by_id(&from_yaml, "cli-disc-found"), Some(found));

    let table = liqoctl(a, &["discover"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(table.stdout.starts_with("CLUSTER ID"), "{table:?}");
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with("cli-disc-found "))
        .ok_or("no table row")?;
    assert!(
        row.contains("DNS") && row.contains("https://cli-disc-found.example:8443"),
        "{row}"
    );
    assert!(row.contains("ago"), "last seen: {row}");

    // info lists peers (a role), not merely discovered clusters.
    let info = liqoctl(a, &["info", "-o", "json"]).await;
    assert_eq!(info.code, 0, "{info:?}");
    let peers: Value = serde_json::from_str(&info.stdout)?;
    assert!(by_id(&peers, "cli-disc-found").is_none(), "{peers}");
    let p = by_id(&peers, "cli-disc-peer").ok_or("peer missing from info")?;
    assert_eq!(p["authentication"]["status"], "True", "{p}");
    assert_eq!(p["offerAccepted"]["status"], "True", "{p}");
    assert_eq!(p["offered"]["cpu"], "2", "{p}");
    assert_eq!(p["offered"]["memory"], "4Gi", "{p}");
    assert_eq!(p["offered"]["pods"], "10", "{p}");
    assert!(p["virtualNode"].is_null(), "no node was made: {p}");
    assert!(p["network"]["tunnel"].is_null(), "{p}");
    assert_eq!(p["used"]["pods"], 0, "{p}");

    let info = liqoctl(a, &["info", "cli-disc-peer", "-o", "yaml"]).await;
    assert_eq!(info.code, 0, "{info:?}");
    let one: Value = serde_yaml_ng::from_str(&info.stdout)?;
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one[0]["clusterId"], "cli-disc-peer");

    let info = liqoctl(a, &["info", "cli-disc-peer"]).await;
    println!("{table:?}\n{info:?}");
    assert_eq!(info.code, 0, "{info:?}");
    assert!(
        info.stdout
            .contains("PEER cli-disc-peer (Cluster cli-disc-peer)"),
        "{info:?}"
    );
    assert!(info.stdout.contains("cpu=2 memory=4Gi pods=10"), "{info:?}");

    let missing = liqoctl(a, &["info", "cli-nobody"]).await;
    assert_eq!(missing.code, 1, "{missing:?}");
    assert!(
        missing.stderr.contains("no ForeignCluster cli-nobody"),
        "{missing:?}"
    );
    assert!(missing.stderr.contains("liqoctl discover"), "{missing:?}");
    Ok(())
}

/// `offload namespace` writes the chosen strategies; waiting without an agent times out naming
/// the step; `unoffload` deletes the object.
#[tokio::test]
async fn offload_and_unoffload_a_namespace() -> TestResult {
    let (a, client) = local().await?;
    let ns = "cli-offload";
    namespace(&client, ns).await?;
    let run = liqoctl(
        a,
        &[
            "offload",
            "namespace",
            ns,
            "--pod-offloading-strategy",
            "Remote",
            "--namespace-mapping-strategy",
            "EnforceSameName",
            "--selector",
            "topology.kubernetes.io/region=eu-west,tier=gold",
            "--wait=false",
        ],
    )
    .await;
    assert_eq!(run.code, 0, "{run:?}");
    let api: Api<NamespaceOffloading> = Api::namespaced(client.clone(), ns);
    let nso = api.get("offloading").await?;
    assert_eq!(
        nso.spec.pod_offloading_strategy,
        PodOffloadingStrategy::Remote
    );
    assert_eq!(
        nso.spec.namespace_mapping_strategy,
        NamespaceMappingStrategy::EnforceSameName
    );
    let terms = nso
        .spec
        .cluster_selector
        .ok_or("no selector")?
        .node_selector_terms;
    let exprs: BTreeMap<String, (String, Vec<String>)> = terms[0]
        .match_expressions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.key, (e.operator, e.values.unwrap_or_default())))
        .collect();
    assert_eq!(
        exprs,
        BTreeMap::from([
            (
                "tier".to_owned(),
                ("In".to_owned(), vec!["gold".to_owned()])
            ),
            (
                "topology.kubernetes.io/region".to_owned(),
                ("In".to_owned(), vec!["eu-west".to_owned()])
            ),
        ])
    );

    // Re-applied with other flags (lower case accepted): the object follows, the selector goes.
    let run = liqoctl(
        a,
        &[
            "offload",
            "namespace",
            ns,
            "--pod-offloading-strategy",
            "local",
            "--namespace-mapping-strategy",
            "SelectedName",
            "--remote-namespace-name",
            "elsewhere",
            "--timeout",
            "3s",
        ],
    )
    .await;
    assert_eq!(
        run.code, 1,
        "no agent runs, so waiting must time out: {run:?}"
    );
    assert!(
        run.stderr
            .contains("timed out after 3.0s waiting for: namespace cli-offload offloaded"),
        "{run:?}"
    );
    assert!(run.stderr.contains("is the liqo agent running"), "{run:?}");
    let nso = api.get("offloading").await?;
    assert_eq!(
        nso.spec.pod_offloading_strategy,
        PodOffloadingStrategy::Local
    );
    assert_eq!(nso.spec.remote_namespace_name.as_deref(), Some("elsewhere"));
    assert!(nso.spec.cluster_selector.is_none(), "{:?}", nso.spec);

    let run = liqoctl(a, &["unoffload", "namespace", ns, "--timeout", "60s"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        api.get_opt("offloading").await?.is_none(),
        "still there after unoffload"
    );
    let again = liqoctl(a, &["unoffload", "namespace", ns]).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("nothing to do"), "{again:?}");

    let run = liqoctl(
        a,
        &["offload", "namespace", "cli-no-such-ns", "--wait=false"],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("namespace cli-no-such-ns does not exist"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("kubectl create namespace cli-no-such-ns"),
        "{run:?}"
    );

    let run = liqoctl(
        a,
        &[
            "offload",
            "namespace",
            ns,
            "--namespace-mapping-strategy",
            "SelectedName",
        ],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--remote-namespace-name"), "{run:?}");
    Ok(())
}

/// `peer` against a provider without cluster info names the ConfigMap and how to get it; a
/// cluster id that is not known names `discover`.
#[tokio::test]
async fn peer_without_cluster_info_says_what_is_missing() -> TestResult {
    let lab = lab().await;
    let (a, _) = local().await?;
    let b = cluster(lab, "b");
    let provider = b.kubeconfig_path().to_string_lossy().into_owned();
    let run = liqoctl(a, &["peer", "--provider-kubeconfig", &provider]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("has no ConfigMap liqo-system/liqo-cluster-info"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("start the liqo agent on the provider"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains(&provider),
        "the hint names the kubeconfig: {run:?}"
    );

    let run = liqoctl(
        a,
        &["peer", "--provider-kubeconfig", "/nonexistent/kubeconfig"],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot load the provider cluster's kubeconfig /nonexistent/kubeconfig"),
        "{run:?}"
    );

    let run = liqoctl(a, &["peer", "cli-never-seen"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("no ForeignCluster cli-never-seen"),
        "{run:?}"
    );
    assert!(run.stderr.contains("liqoctl discover"), "{run:?}");
    Ok(())
}

/// `peer` end to end. `a` is the provider (its `PeeringServer` and published cluster info), `b`
/// the consumer (so `b` never has cluster info for the test above). Before the consumer's agent
/// runs: the ForeignCluster gets the provider's id, endpoint, fingerprint and role, the first
/// step times out naming itself, role changes keep what was pinned, another published key is
/// refused. Then with the consumer's `PeeringController` and virtual kubelet running, `peer`
/// converges to a Ready virtual node, `info` and `diagnose` see it, and `unpeer` removes it.
#[tokio::test]
async fn peer_declares_intent_and_converges_with_the_agents() -> TestResult {
    let lab = lab().await;
    let (a, ca) = local().await?;
    let b = cluster(lab, "b");
    let cb = b.client()?;
    install_crds(&cb).await?;
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();

    // The provider: identity, peering server, published cluster info.
    let provider_id = "cli-peer-prov";
    let identity = Arc::new(LocalIdentity::generate(id(provider_id), "Provider P")?);
    let config = ProviderConfig::new(
        ApiEndpoint::new(a.api_url(), a.ca_cert_pem()),
        OfferPolicy::Absolute(liqo_core::ResourceOffer::new("2", "4Gi", 10)),
        NetworkSource::Static(network(a)),
    )
    .with_credential_lifetime(Duration::from_secs(600));
    let provider = Arc::new(Provider::new(ca.clone(), identity.clone(), config));
    let (addr, _server) = PeeringServer::new(provider)
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let endpoint = format!("https://{addr}");
    let info = liqo_core::ClusterInfo {
        cluster_id: id(provider_id),
        cluster_name: Some("Provider P".into()),
        peering_endpoint: Some(endpoint.clone()),
        fingerprint: identity.fingerprint(),
        network: None,
    };
    liqo_core::info::publish(&ca, &info).await?;
    let provider_kc = a.kubeconfig_path().to_string_lossy().into_owned();

    // No consumer agent yet: the intent is declared, the first step times out.
    let run = liqoctl(
        b,
        &[
            "peer",
            "--provider-kubeconfig",
            &provider_kc,
            "--timeout",
            "3s",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "no agent runs: {run:?}");
    assert!(
        run.stderr.contains(&format!(
            "timed out after 3.0s waiting for: authenticated with {provider_id} (last seen: no Authenticated condition yet)"
        )),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("is the liqo agent running here"),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("liqoctl diagnose {provider_id}")),
        "{run:?}"
    );
    let fcs: Api<ForeignCluster> = Api::all(cb.clone());
    let fc = fcs.get(provider_id).await?;
    assert_eq!(fc.spec.role, PeeringRole::Provider);
    assert_eq!(fc.spec.cluster_name.as_deref(), Some("Provider P"));
    assert_eq!(fc.spec.peering_endpoint.as_deref(), Some(endpoint.as_str()));
    assert_eq!(fc.spec.public_key_fingerprint, Some(identity.fingerprint()));
    assert_eq!(fc.spec.discovery.source, DiscoverySource::Manual);
    let managers: Vec<String> = fc
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"liqoctl".to_owned()), "{managers:?}");

    // Unpeering keeps the pinned endpoint and key (liqoctl never drops a field it set).
    let run = liqoctl(b, &["unpeer", provider_id, "--wait=false"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let fc = fcs.get(provider_id).await?;
    assert_eq!(fc.spec.role, PeeringRole::None);
    assert_eq!(fc.spec.public_key_fingerprint, Some(identity.fingerprint()));
    assert_eq!(fc.spec.peering_endpoint.as_deref(), Some(endpoint.as_str()));

    // A peer that consumes from us becomes Both, and goes back to Consumer.
    fcs.patch(
        provider_id,
        &PatchParams::apply("liqoctl-test").force(),
        &Patch::Apply(json!({
            "apiVersion": "liqo.io/v1alpha1", "kind": "ForeignCluster",
            "spec": {"clusterId": provider_id, "role": "Consumer", "discovery": {"source": "Manual"}},
        })),
    )
    .await?;
    let run = liqoctl(b, &["peer", provider_id, "--wait=false"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stderr.contains("role Both (was Consumer)"), "{run:?}");
    assert_eq!(fcs.get(provider_id).await?.spec.role, PeeringRole::Both);
    let run = liqoctl(b, &["unpeer", provider_id, "--wait=false"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(fcs.get(provider_id).await?.spec.role, PeeringRole::Consumer);
    // Give the role back to liqoctl alone, as a fresh `peer` would find it.
    fcs.patch(
        provider_id,
        &PatchParams::apply("liqoctl-test").force(),
        &Patch::Apply(json!({
            "apiVersion": "liqo.io/v1alpha1", "kind": "ForeignCluster",
            "spec": {"clusterId": provider_id, "role": "None", "discovery": {"source": "Manual"}},
        })),
    )
    .await?;

    // The provider publishes another key: refused, the pinned one stays.
    liqo_core::info::publish(
        &ca,
        &liqo_core::ClusterInfo {
            fingerprint: fingerprint(43),
            ..info.clone()
        },
    )
    .await?;
    let run = liqoctl(
        b,
        &[
            "peer",
            "--provider-kubeconfig",
            &provider_kc,
            "--wait=false",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "ForeignCluster {provider_id} pins key {}",
            identity.fingerprint()
        )),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("kubectl delete foreigncluster {provider_id}")),
        "{run:?}"
    );
    assert_eq!(
        fcs.get(provider_id).await?.spec.public_key_fingerprint,
        Some(identity.fingerprint())
    );
    liqo_core::info::publish(&ca, &info).await?;

    // The consumer's agent: the ForeignCluster-driven peering controller and the virtual kubelet.
    let consumer_id = id("cli-peer-cons");
    let consumer = Arc::new(Consumer::new(
        cb.clone(),
        Arc::new(LocalIdentity::generate(consumer_id.clone(), "Consumer C")?),
        NetworkSource::Static(network(b)),
        Arc::new(HttpsConnector::default()),
    ));
    let s = stop.clone();
    tokio::spawn(
        liqo_peering_csr::peering_controller(cb.clone(), consumer)
            .run(async move { s.cancelled().await }),
    );
    let vk = ConsumerAgent::builder(cb.clone(), consumer_id)
        .config(ConsumerConfig {
            heartbeat: Duration::from_secs(2),
            webhook: None,
            ..ConsumerConfig::default()
        })
        .build();
    let s = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = vk.run(async move { s.cancelled().await }).await {
            eprintln!("consumer agent failed: {e}");
        }
    });

    let run = liqoctl(
        b,
        &[
            "peer",
            "--provider-kubeconfig",
            &provider_kc,
            "--timeout",
            "120s",
        ],
    )
    .await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    for line in [
        format!("✓ authenticated with {provider_id}"),
        format!("✓ offer from {provider_id} accepted"),
        format!("- network to {provider_id} ready: skipped"),
        format!("✓ virtual node liqo-{provider_id} Ready"),
    ] {
        assert!(run.stderr.contains(&line), "{line}: {run:?}");
    }
    let run = liqoctl(b, &["info", provider_id, "-o", "json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let peers: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(peers[0]["virtualNode"]["ready"], "True", "{peers}");
    assert_eq!(peers[0]["virtualNode"]["capacity"]["cpu"], "2", "{peers}");
    assert_eq!(peers[0]["offered"]["memory"], "4Gi", "{peers}");
    let run = liqoctl(b, &["diagnose", provider_id]).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ provider API reachable with the credential"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("✓ offloaded pods admitted: 0 pods on liqo-"),
        "{run:?}"
    );

    let run = liqoctl(b, &["unpeer", provider_id, "--timeout", "120s"]).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("✓ virtual node liqo-{provider_id} removed")),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("✓ peering with {provider_id} released")),
        "{run:?}"
    );
    assert!(
        Api::<Node>::all(cb.clone())
            .get_opt(&format!("liqo-{provider_id}"))
            .await?
            .is_none()
    );
    assert_eq!(fcs.get(provider_id).await?.spec.role, PeeringRole::None);
    Ok(())
}

fn network(c: &Cluster) -> NetworkParameters {
    NetworkParameters::new(
        c.pod_cidr().to_string().parse().expect("lab pod CIDR"),
        c.service_cidr()
            .to_string()
            .parse()
            .expect("lab service CIDR"),
    )
}

/// A kubeconfig for `server` with a client certificate, in `namespace`.
fn kubeconfig(
    server: &str,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    namespace: &str,
) -> String {
    serde_yaml_ng::to_string(&json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "p", "cluster": {"server": server, "certificate-authority-data": B64.encode(ca_pem)}}],
        "users": [{"name": "u", "user": {"client-certificate-data": B64.encode(cert_pem), "client-key-data": B64.encode(key_pem)}}],
        "contexts": [{"name": "p", "context": {"cluster": "p", "user": "u", "namespace": namespace}}],
        "current-context": "p",
    }))
    .expect("kubeconfig renders")
}

async fn credential_secret(client: &Client, provider: &str, kubeconfig: &str) -> TestResult {
    let ns = format!("liqo-tenant-{provider}");
    namespace(client, &ns).await?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(format!("liqo-kubeconfig-{provider}")),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            ByteString(kubeconfig.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// `diagnose` stops at the step that fails and says what to do: an absent credential, an expired
/// one; with a working credential and no network fabric it passes and skips the tunnel.
#[tokio::test]
async fn diagnose_stops_at_the_failing_step() -> TestResult {
    let lab = lab().await;
    let (a, client) = local().await?;
    let b = cluster(lab, "b");
    let stages = ["Authenticated", "OfferAccepted"];

    // 1. No credential at all.
    foreign_cluster(
        &client,
        "cli-diag-absent",
        DiscoverySource::Manual,
        PeeringRole::Provider,
        &stages,
    )
    .await?;
    let run = liqoctl(a, &["diagnose", "cli-diag-absent"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout.contains("✓ local API server reachable"),
        "{run:?}"
    );
    assert!(run.stdout.contains("✓ Authenticated"), "{run:?}");
    assert!(run.stdout.contains("✓ OfferAccepted"), "{run:?}");
    assert!(
        run.stdout.contains("✗ credential present: Secret liqo-tenant-cli-diag-absent/liqo-kubeconfig-cli-diag-absent not found"),
        "{run:?}"
    );
    assert!(
        run.stdout
            .contains("liqoctl unpeer cli-diag-absent && liqoctl peer cli-diag-absent"),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains("credential valid"),
        "stops at the first failure: {run:?}"
    );
    let json_run = liqoctl(a, &["diagnose", "cli-diag-absent", "-o", "json"]).await;
    assert_eq!(json_run.code, 1, "{json_run:?}");
    let reports: Value = serde_json::from_str(&json_run.stdout)?;
    let checks = reports[1]["checks"].as_array().ok_or("no checks")?;
    let last = checks.last().ok_or("empty")?;
    assert_eq!(
        (last["step"].as_str(), last["outcome"].as_str()),
        (Some("credential present"), Some("failed")),
        "{reports}"
    );
    assert!(last["hint"].is_string(), "{last}");

    // 2. An expired client certificate.
    foreign_cluster(
        &client,
        "cli-diag-expired",
        DiscoverySource::Manual,
        PeeringRole::Provider,
        &stages,
    )
    .await?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["liqo-consumer-a".to_owned()])?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    let cert = params.self_signed(&key)?;
    let kc = kubeconfig(
        b.api_url(),
        b.ca_cert_pem(),
        &cert.pem(),
        &key.serialize_pem(),
        "liqo-tenant-a",
    );
    credential_secret(&client, "cli-diag-expired", &kc).await?;
    let run = liqoctl(a, &["diagnose", "cli-diag-expired"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stdout.contains("✓ credential present"), "{run:?}");
    assert!(
        run.stdout
            .contains("✗ credential valid: the client certificate expired at 2020-01-02T00:00:00Z"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("credential rotation did not renew it"),
        "{run:?}"
    );
    assert!(!run.stdout.contains("provider API reachable"), "{run:?}");

    // 3. A working credential for cluster b, and an offer there: every step passes, the network
    //    steps are skipped because no fabric reports on this peer.
    foreign_cluster(
        &client,
        "cli-diag-good",
        DiscoverySource::Manual,
        PeeringRole::Provider,
        &stages,
    )
    .await?;
    let bc = b.client()?;
    install_crds(&bc).await?;
    namespace(&bc, "liqo-tenant-cli-diag-consumer").await?;
    let offer = ResourceOffer::new(
        "cli-diag-good",
        ResourceOfferSpec {
            provider_cluster_id: id("cli-diag-good"),
            consumer_cluster_id: id("cli-diag-consumer"),
            resources: liqo_core::ResourceOffer::new("3", "6Gi", 30),
            cordoned: false,
        },
    );
    Api::<ResourceOffer>::namespaced(bc.clone(), "liqo-tenant-cli-diag-consumer")
        .patch(
            "cli-diag-good",
            &PatchParams::apply("liqoctl-test").force(),
            &Patch::Apply(&offer),
        )
        .await?;
    let user = b.issue_client_cert("liqo-consumer-cli-diag", &["system:masters"])?;
    let kc = kubeconfig(
        b.api_url(),
        b.ca_cert_pem(),
        &user.cert_pem,
        &user.key_pem,
        "liqo-tenant-cli-diag-consumer",
    );
    credential_secret(&client, "cli-diag-good", &kc).await?;
    let run = liqoctl(a, &["diagnose", "cli-diag-good"]).await;
    println!("{run:?}");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ credential valid: client certificate valid until"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("✓ provider API reachable with the credential: read ResourceOffer liqo-tenant-cli-diag-consumer/cli-diag-good"),
        "{run:?}"
    );
    assert!(run.stdout.contains("cpu=3 memory=6Gi pods=30"), "{run:?}");
    assert!(
        run.stdout
            .contains("- tunnel handshake recent: no Tunnel and no NetworkReady"),
        "{run:?}"
    );

    // 4. An unpeered cluster is reported as such.
    foreign_cluster(
        &client,
        "cli-diag-none",
        DiscoverySource::Dns,
        PeeringRole::None,
        &[],
    )
    .await?;
    let run = liqoctl(a, &["diagnose", "cli-diag-none"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("✗ ForeignCluster cli-diag-none: role None: not peered"),
        "{run:?}"
    );
    assert!(run.stdout.contains("liqoctl peer cli-diag-none"), "{run:?}");
    Ok(())
}

/// `diagnose` on a peering with a network: a stale handshake fails its step; with a recent one,
/// traffic is proven by the Tunnel's received bytes growing within the window, and fails without.
#[tokio::test]
async fn diagnose_checks_the_tunnel() -> TestResult {
    let lab = lab().await;
    let (a, client) = local().await?;
    let b = cluster(lab, "b");
    let peer = "cli-diag-net";
    let tenant = format!("liqo-tenant-{peer}");
    foreign_cluster(
        &client,
        peer,
        DiscoverySource::Manual,
        PeeringRole::Provider,
        &["Authenticated", "OfferAccepted", "NetworkReady"],
    )
    .await?;
    // A working credential for b, with an offer there.
    let bc = b.client()?;
    install_crds(&bc).await?;
    namespace(&bc, "liqo-tenant-cli-diag-net-consumer").await?;
    let offer = ResourceOffer::new(
        peer,
        ResourceOfferSpec {
            provider_cluster_id: id(peer),
            consumer_cluster_id: id("cli-diag-net-consumer"),
            resources: liqo_core::ResourceOffer::new("1", "1Gi", 5),
            cordoned: false,
        },
    );
    Api::<ResourceOffer>::namespaced(bc.clone(), "liqo-tenant-cli-diag-net-consumer")
        .patch(
            peer,
            &PatchParams::apply("liqoctl-test").force(),
            &Patch::Apply(&offer),
        )
        .await?;
    let user = b.issue_client_cert("liqo-consumer-cli-diag-net", &["system:masters"])?;
    let kc = kubeconfig(
        b.api_url(),
        b.ca_cert_pem(),
        &user.cert_pem,
        &user.key_pem,
        "liqo-tenant-cli-diag-net-consumer",
    );
    credential_secret(&client, peer, &kc).await?;

    let tunnels: Api<Tunnel> = Api::namespaced(client.clone(), &tenant);
    let tunnel = json!({
        "apiVersion": "liqo.io/v1alpha1", "kind": "Tunnel",
        "metadata": {"name": peer},
        "spec": {"clusterId": peer, "endpoint": "192.0.2.1:51820", "peerPublicKey": B64.encode([9u8; 32])},
    });
    tunnels
        .patch(
            peer,
            &PatchParams::apply("liqoctl-test").force(),
            &Patch::Apply(&tunnel),
        )
        .await?;
    let set_status = |handshake: Timestamp, rx: u64| {
        let tunnels = tunnels.clone();
        async move {
            tunnels
                .patch_status(
                    peer,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {
                        "interface": "liqo-wg0",
                        "latestHandshake": handshake.to_string(),
                        "rxBytes": rx, "txBytes": rx,
                    }})),
                )
                .await
                .map(drop)
        }
    };

    // 1. The last handshake is ten minutes old.
    let old = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(600);
    set_status(old, 1000).await?;
    let run = liqoctl(a, &["diagnose", peer]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ provider API reachable with the credential"),
        "{run:?}"
    );
    assert!(run.stdout.contains("✓ NetworkReady"), "{run:?}");
    assert!(
        run.stdout
            .contains("✗ tunnel handshake recent: the last handshake was 10m0"),
        "{run:?}"
    );
    assert!(run.stdout.contains("(more than 3m00s)"), "{run:?}");
    assert!(
        run.stdout
            .contains("check UDP reachability of 192.0.2.1:51820"),
        "{run:?}"
    );
    assert!(
        !run.stdout.contains("traffic through the tunnel"),
        "{run:?}"
    );

    // 2. A recent handshake, and no traffic within the window.
    set_status(Timestamp::now(), 1000).await?;
    let run = liqoctl(a, &["diagnose", peer, "--traffic-window", "2s"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ tunnel handshake recent: latest handshake"),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!(
            "✗ traffic through the tunnel: no packets came through Tunnel {tenant}/{peer} in 2.0s (rx 1000 bytes)"
        )),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("nft list table inet liqo-wg0"),
        "{run:?}"
    );

    // 3. Bytes keep arriving (as a gateway's counters would) while diagnose watches.
    let diagnose =
        tokio::spawn(
            async move { liqoctl(a, &["diagnose", peer, "--traffic-window", "60s"]).await },
        );
    let mut rx = 1000;
    for _ in 0..90 {
        if diagnose.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        rx += 4096;
        set_status(Timestamp::now(), rx).await?;
    }
    let run = diagnose.await?;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("✓ traffic through the tunnel: received 4096 bytes"),
        "{run:?}"
    );
    Ok(())
}

/// Usage errors exit 2; `kubectl-liqo` is the same CLI under kubectl's name.
#[tokio::test]
async fn usage_errors_and_the_kubectl_plugin() -> TestResult {
    let liqoctl = env!("CARGO_BIN_EXE_liqoctl");
    let plugin = env!("CARGO_BIN_EXE_kubectl-liqo");
    let run = run_bin(liqoctl, None, &["bogus"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = run_bin(liqoctl, None, &["peer"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("--provider-kubeconfig"), "{run:?}");
    let run = run_bin(
        liqoctl,
        None,
        &["offload", "namespace", "x", "--selector", "novalue"],
    )
    .await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("is not key=value"), "{run:?}");
    let run = run_bin(liqoctl, None, &["--timeout", "5parsecs", "discover"]).await;
    assert_eq!(run.code, 2, "{run:?}");

    let run = run_bin(plugin, None, &["--help"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("kubectl liqo"), "{run:?}");
    let run = run_bin(plugin, None, &["version", "-o", "json"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let v: Value = serde_json::from_str(&run.stdout)?;
    assert_eq!(v["client"], env!("CARGO_PKG_VERSION"));

    // A kubeconfig that points nowhere: exit 1 with what to check.
    let run = run_bin(liqoctl, None, &["--kubeconfig", "/nonexistent", "discover"]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot load the local cluster's kubeconfig /nonexistent"),
        "{run:?}"
    );
    Ok(())
}
