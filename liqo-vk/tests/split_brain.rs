//! Split brain: the consumer is cut off (its API server stopped) while its pods run on the
//! provider. The remote pods must keep running (the provider even heals them on its own), and on
//! reconnection nothing is lost or duplicated and statuses converge. Then the provider goes away
//! and the virtual node turns NotReady, so Kubernetes' ordinary eviction applies.
//!
//! One test in its own binary: stopping an API server would disturb concurrent tests.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
    runtime::watcher,
};
use liqo_core::{
    AddressTranslator, CidrMapping, ResourceOffer,
    crds::{PodOffloadingStrategy, VirtualNode},
};
use liqo_lab::{ClusterSpec, Component, LabSpec};
use liqo_vk::{
    ConsumerAgent, ConsumerConfig, ProviderAgent, StaticTranslation, names, shadow::ShadowPod,
};

const CONSUMER: &str = "sb-consumer";
const PROVIDER: &str = "sb-provider";

fn nodes_api(c: &kube::Client) -> Api<Node> {
    Api::all(c.clone())
}

fn node_ready(n: &Node) -> Option<bool> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_keeps_remote_pods_and_converges() -> TestResult {
    init_tracing();
    let lab =
        liqo_lab::shared(|| LabSpec::new([ClusterSpec::new(CONSUMER), ClusterSpec::new(PROVIDER)]))
            .await?;
    let (consumer, provider) = (
        lab.cluster(CONSUMER).ok_or("no consumer")?,
        lab.cluster(PROVIDER).ok_or("no provider")?,
    );
    let (c, p) = (consumer.client()?, provider.client()?);
    install_crds(&c, &[]).await?;
    install_crds(&p, &[]).await?;
    simulate_peering(
        consumer,
        &id(CONSUMER),
        provider,
        &id(PROVIDER),
        ResourceOffer::new("8", "16Gi", 100),
    )
    .await?;
    let mapping = CidrMapping::new("10.244.0.0/16".parse()?, "10.71.0.0/16".parse()?)?;
    let translator = AddressTranslator::new(id(PROVIDER), vec![mapping]);
    let provider_agent =
        tokio::spawn(ProviderAgent::new(p.clone(), id(PROVIDER)).run(std::future::pending()));
    let agent = ConsumerAgent::builder(c.clone(), id(CONSUMER))
        .reflectors(liqo_reflectors_k8s::all())
        .translation(StaticTranslation::identity().with(id(PROVIDER), vec![mapping]))
        .config(ConsumerConfig {
            heartbeat: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            ..ConsumerConfig::default()
        })
        .build();
    let consumer_agent = tokio::spawn(agent.run(std::future::pending()));

    let ns = "sb";
    let twin = format!("{ns}-{CONSUMER}");
    offload(&c, ns, spec(PodOffloadingStrategy::Remote)).await?;
    wait_offloading(&c, ns, "Ready").await?;
    create(
        &Api::<Deployment>::namespaced(c.clone(), ns),
        &deployment("web", 5, "nginx"),
    )
    .await?;
    let rpods: Api<Pod> = Api::namespaced(p.clone(), &twin);
    wait_for(
        rpods.clone(),
        watcher::Config::default(),
        "5 remote pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 5,
    )
    .await?;
    wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        "5 local pods Running",
        WAIT,
        |ps| ps.iter().filter(|p| running(p)).count() == 5,
    )
    .await?;
    let before: Vec<String> = Api::<ShadowPod>::namespaced(p.clone(), &twin)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert_eq!(before.len(), 5);

    // Cut the consumer off.
    consumer.stop_component(Component::ApiServer).await?;
    // While it is away the provider heals a lost pod on its own (from its ShadowPod).
    let victim = rpods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .next()
        .ok_or("no remote pod")?;
    let victim_origin = victim
        .annotations()
        .get(names::ORIGIN_POD)
        .cloned()
        .ok_or("no origin")?;
    rpods
        .delete(&victim.name_any(), &DeleteParams::default().grace_period(0))
        .await?;
    let victim_uid = victim.uid();
    wait_for(
        rpods.clone(),
        watcher::Config::default(),
        "the provider to recreate the lost pod",
        WAIT,
        move |ps| {
            ps.iter().filter(|p| running(p)).count() == 5
                && ps.iter().all(|p| p.uid() != victim_uid)
        },
    )
    .await?;
    // An observation window: nothing the agent does while cut off may remove remote pods.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = rpods.list(&ListParams::default()).await?.items;
    assert_eq!(
        during.iter().filter(|p| running(p)).count(),
        5,
        "remote pods keep running while the consumer is away"
    );

    // Reconnect: statuses converge, nothing lost or duplicated.
    consumer.start_component(Component::ApiServer).await?;
    let c = consumer.client()?;
    let remote_now = rpods.list(&ListParams::default()).await?.items;
    let want_ips: BTreeMap<String, String> = remote_now
        .iter()
        .filter(|p| running(p))
        .filter_map(|p| {
            Some((
                p.annotations().get(names::ORIGIN_POD)?.clone(),
                translator.to_local_view(pod_ip(p)?).ok()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(want_ips.len(), 5);
    let victim_name = victim_origin.clone();
    let local = wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        "local statuses to converge",
        WAIT,
        move |ps| {
            ps.len() == 5
                && ps.iter().all(|p| {
                    running(p)
                        && want_ips.get(&p.name_any()).map(String::as_str)
                            == p.status.as_ref().and_then(|s| s.pod_ip.as_deref())
                })
                && ps.iter().any(|p| {
                    p.name_any() == victim_name
                        && p.status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|cs| cs[0].restart_count == 1)
                })
        },
    )
    .await?;
    assert_eq!(local.len(), 5);
    let after: Vec<String> = Api::<ShadowPod>::namespaced(p.clone(), &twin)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert_eq!(after, before, "the same ShadowPods, none added or lost");
    let live = rpods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    assert_eq!(live, 5, "no duplicate remote pods");

    // The provider goes away: the virtual node turns NotReady, then Ready again.
    let nodes: Api<Node> = Api::all(c.clone());
    let node = names::node_name(&id(PROVIDER));
    provider.stop_component(Component::ApiServer).await?;
    wait_one(nodes.clone(), &node, "the virtual node NotReady", |n| {
        n.and_then(node_ready) == Some(false)
    })
    .await?;
    let vns: Api<VirtualNode> = Api::namespaced(
        c.clone(),
        &liqo_core::names::tenant_namespace(&id(PROVIDER)),
    );
    wait_one(vns.clone(), PROVIDER, "the VirtualNode NotReady", |v| {
        v.and_then(|v| v.status.as_ref())
            .and_then(|s| liqo_core::conditions::find(&s.conditions, "Ready"))
            .is_some_and(|c| c.status == "False" && c.reason == "ProviderUnreachable")
    })
    .await?;
    provider.start_component(Component::ApiServer).await?;
    wait_one(nodes, &node, "the virtual node Ready again", |n| {
        n.and_then(node_ready) == Some(true)
    })
    .await?;
    wait_one(vns.clone(), PROVIDER, "the VirtualNode Ready again", |v| {
        v.and_then(|v| v.status.as_ref())
            .is_some_and(|s| liqo_core::conditions::is_true(&s.conditions, "Ready"))
    })
    .await?;

    // Unpeering removes the virtual node and its lease.
    vns.delete(PROVIDER, &Default::default()).await?;
    wait_one(nodes_api(&c), &node, "the virtual node deleted", |n| {
        n.is_none()
    })
    .await?;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(c.clone(), "kube-node-lease");
    wait_one(leases, &node, "the node lease deleted", |l| l.is_none()).await?;
    wait_one(
        vns,
        PROVIDER,
        "the VirtualNode gone (finalizer released)",
        |v| v.is_none(),
    )
    .await?;
    consumer_agent.abort();
    provider_agent.abort();
    Ok(())
}
