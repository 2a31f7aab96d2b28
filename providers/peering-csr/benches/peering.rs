//! Peering time in the lab: from the command to the credential and offer stored on the consumer.
//!
//! ```sh
//! cargo bench -p liqo-peering-csr --bench peering -- [runs]      # default 20 runs
//! ```
//!
//! Starts its own lab of two clusters, then measures, `runs` times each:
//! * **baseline**: the bare CSR round trip on the provider (create, approve, wait for the signed
//!   certificate), the floor under any CSR-based credential;
//! * **one-command**: [`AdminPeering::peer`] (challenge, signature, tenant, quota, RBAC, CSR,
//!   and the Secret, ResourceOffer, VirtualNode and ForeignCluster conditions on the consumer);
//! * **https**: the same through the provider's HTTPS peering endpoint on 127.0.0.1;
//! * **unpeer**: both sides, until the namespaces are gone.

use std::{sync::Arc, time::Duration, time::Instant};

use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::wait::await_condition,
};
use liqo_core::{NetworkParameters, PeeringTarget, ResourceOffer};
use liqo_lab::{Cluster, ClusterSpec, Lab, LabSpec};
use liqo_peering_csr::{
    AdminPeering, ApiEndpoint, Consumer, HttpsConnector, LocalIdentity, NetworkSource, OfferPolicy,
    PeeringServer, ProviderConfig,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn network(c: &Cluster) -> Result<NetworkParameters, BoxError> {
    Ok(NetworkParameters::new(
        c.pod_cidr().to_string().parse()?,
        c.service_cidr().to_string().parse()?,
    ))
}

fn config(c: &Cluster) -> Result<ProviderConfig, BoxError> {
    Ok(ProviderConfig::new(
        ApiEndpoint::new(c.api_url(), c.ca_cert_pem()),
        OfferPolicy::Absolute(ResourceOffer::new("4", "8Gi", 50)),
        NetworkSource::Static(network(c)?),
    ))
}

async fn install_crds(client: &Client) -> Result<(), BoxError> {
    Ok(liqo_core::crds::install(client, &[], "liqo-bench").await?)
}

/// The bare CSR round trip: create, approve, signed.
async fn csr_round_trip(client: &Client, i: usize) -> Result<Duration, BoxError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("bench-{i}"));
    let pem = params.serialize_request(&key)?.pem()?;
    let name = format!("bench-{i}");
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let started = Instant::now();
    csrs.create(
        &PostParams::default(),
        &CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.into_bytes()),
                signer_name: "kubernetes.io/kube-apiserver-client".into(),
                usages: Some(vec!["client auth".into()]),
                expiration_seconds: Some(600),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        },
    )
    .await?;
    let approval = serde_json::json!({"status": {"conditions": [{"type": "Approved", "status": "True", "reason": "Bench", "message": "bench"}]}});
    csrs.patch_subresource(
        "approval",
        &name,
        &PatchParams::default(),
        &Patch::Merge(&approval),
    )
    .await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(
            csrs.clone(),
            &name,
            |c: Option<&CertificateSigningRequest>| {
                c.and_then(|c| c.status.as_ref())
                    .and_then(|s| s.certificate.as_ref())
                    .is_some_and(|c| !c.0.is_empty())
            },
        ),
    )
    .await??;
    let took = started.elapsed();
    csrs.delete(&name, &DeleteParams::default()).await?;
    Ok(took)
}

fn summary(name: &str, mut samples: Vec<Duration>) -> String {
    samples.sort();
    let pct = |p: f64| {
        let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[idx.min(samples.len() - 1)]
    };
    format!(
        "| {name} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
        samples.len(),
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.95).as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), BoxError> {
    let runs: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let lab = Lab::start(LabSpec::new([
        ClusterSpec::new("bench-a"),
        ClusterSpec::new("bench-b"),
    ]))
    .await?;
    let (a, b) = (
        lab.cluster("bench-a").ok_or("no bench-a")?,
        lab.cluster("bench-b").ok_or("no bench-b")?,
    );
    let (ca, cb) = (a.client()?, b.client()?);
    install_crds(&ca).await?;
    install_crds(&cb).await?;

    // Warm-up, not measured: first-use costs (connections, identity Secrets, RBAC informers).
    let admin = AdminPeering::new(&ca, &cb, config(b)?, network(a)?).await?;
    admin.peer().await?;
    admin.unpeer().await?;
    csr_round_trip(&cb, usize::MAX).await?;

    let (mut baseline, mut one, mut unpeer, mut https) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        baseline.push(csr_round_trip(&cb, i).await?);
        let started = Instant::now();
        admin.peer().await?;
        one.push(started.elapsed());
        let started = Instant::now();
        admin.unpeer().await?;
        unpeer.push(started.elapsed());
    }

    // Peer to peer: the provider's endpoint on loopback, the consumer knowing endpoint + key.
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, server) = PeeringServer::new(admin.provider.clone())
        .spawn("127.0.0.1:0".parse()?, stop.clone().cancelled_owned())
        .await?;
    let consumer = Consumer::new(
        ca.clone(),
        Arc::new(LocalIdentity::load_or_create(&ca, &Default::default()).await?),
        NetworkSource::Static(network(a)?),
        Arc::new(HttpsConnector::default()),
    );
    let target = PeeringTarget {
        cluster_id: Some(admin.provider.identity().id().clone()),
        endpoint: format!("https://{addr}"),
        expected_fingerprint: Some(admin.provider.identity().fingerprint()),
    };
    for _ in 0..runs {
        let started = Instant::now();
        consumer.request(&target).await?;
        https.push(started.elapsed());
        consumer.release(admin.provider.identity().id()).await?;
    }
    stop.cancel();
    server.await??;

    println!("| path | runs | p50 | p95 | min | max |");
    println!("|---|---|---|---|---|---|");
    println!(
        "{}",
        summary("baseline: bare CSR create → approve → signed", baseline)
    );
    println!("{}", summary("one-command peering (in-process)", one));
    println!("{}", summary("peer-to-peer peering over HTTPS", https));
    println!("{}", summary("unpeer, both sides, namespaces gone", unpeer));
    lab.stop().await?;
    Ok(())
}
