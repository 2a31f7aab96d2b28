//! kill -9 of the consumer agent (a real process, `liqo-vk-agent`) in the middle of a burst of
//! pod creations, and again in a burst of deletions: after a restart there are zero orphans and
//! zero duplicates on the provider.

mod common;

use std::{collections::BTreeSet, sync::Arc};

use common::*;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Node, Pod},
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
    runtime::watcher,
};
use liqo_core::{ResourceOffer, crds::PodOffloadingStrategy, labels};
use liqo_lab::{Cluster, ClusterSpec, LabSpec};
use liqo_vk::{ProviderAgent, names, shadow::ShadowPod};
use tokio::process::Child;

const CONSUMER: &str = "cr-consumer";
const PROVIDER: &str = "cr-provider";

fn spawn_agent(consumer: &Cluster, webhook_port: u16) -> BoxResult<Child> {
    spawn_vk_agent(
        "consumer",
        consumer,
        &[
            "--webhook".into(),
            format!("127.0.0.1:{webhook_port}"),
            "--map".into(),
            format!("{PROVIDER}=10.244.0.0/16:10.71.0.0/16"),
            "--heartbeat-ms".into(),
            "1000".into(),
        ],
        "liqo_vk=info",
    )
}

async fn kill9(child: &mut Child) -> TestResult {
    // tokio's kill is SIGKILL on Unix: no shutdown path runs.
    child.kill().await?;
    Ok(())
}

/// Every ShadowPod and live remote pod stands for exactly one existing local pod.
async fn assert_exact(
    c: &kube::Client,
    p: &kube::Client,
    ns: &str,
    twin: &str,
    n: usize,
) -> TestResult {
    let local = wait_for(
        Api::<Pod>::namespaced(c.clone(), ns),
        watcher::Config::default(),
        &format!("{n} local pods Running"),
        WAIT,
        |ps| ps.len() == n && ps.iter().all(|p| running(p)),
    )
    .await?;
    let node = names::node_name(&id(PROVIDER));
    assert!(
        local.iter().all(|p| node_of(p) == node),
        "every pod runs on the virtual node"
    );
    let by_name: BTreeSet<(String, String)> = local
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    let rs = wait_for(
        Api::<ShadowPod>::namespaced(p.clone(), twin),
        watcher::Config::default(),
        &format!("{n} ShadowPods"),
        WAIT,
        |r| r.len() == n,
    )
    .await?;
    let rs_set: BTreeSet<(String, String)> = rs
        .iter()
        .map(|r| {
            (
                r.name_any(),
                r.labels()
                    .get(names::ORIGIN_POD_UID)
                    .cloned()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        rs_set, by_name,
        "ShadowPods are exactly the local pods (name and uid)"
    );
    let remote = wait_for(
        Api::<Pod>::namespaced(p.clone(), twin),
        watcher::Config::default(),
        &format!("{n} remote pods"),
        WAIT,
        |ps| ps.len() == n && ps.iter().all(|p| running(p)),
    )
    .await?;
    let origins: Vec<String> = remote
        .iter()
        .filter_map(|p| p.annotations().get(names::ORIGIN_POD).cloned())
        .collect();
    let unique: BTreeSet<String> = origins.iter().cloned().collect();
    assert_eq!(origins.len(), unique.len(), "no duplicate remote pods");
    assert_eq!(
        unique,
        by_name.iter().map(|(n, _)| n.clone()).collect(),
        "no orphan remote pods"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_leaves_no_orphans_or_duplicates() -> TestResult {
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
        ResourceOffer::new("32", "64Gi", 300),
    )
    .await?;
    let provider_agent =
        tokio::spawn(ProviderAgent::new(p.clone(), id(PROVIDER)).run(std::future::pending()));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut agent = spawn_agent(consumer, port)?;
    wait_for(
        Api::<Node>::all(c.clone()),
        watcher::Config::default().labels(&format!(
            "{}={}",
            labels::TYPE,
            labels::TYPE_VIRTUAL_NODE
        )),
        "the virtual node Ready",
        WAIT,
        |ns| {
            ns.iter().any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
        },
    )
    .await?;
    let ns = "burst";
    let twin = format!("{ns}-{CONSUMER}");
    offload(&c, ns, spec(PodOffloadingStrategy::Remote)).await?;
    wait_offloading(&c, ns, "Ready").await?;

    // A burst of creations, killed a quarter of the way through.
    let deps: Api<Deployment> = Api::namespaced(c.clone(), ns);
    create(&deps, &deployment("web", 60, "nginx")).await?;
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s = seen.clone();
    wait_for(
        Api::<ShadowPod>::namespaced(p.clone(), &twin),
        watcher::Config::default(),
        "15 ShadowPods",
        WAIT,
        move |r| {
            s.store(r.len(), std::sync::atomic::Ordering::SeqCst);
            r.len() >= 15
        },
    )
    .await?;
    kill9(&mut agent).await?;
    let at_kill = seen.load(std::sync::atomic::Ordering::SeqCst);
    assert!(at_kill < 60, "killed mid-burst ({at_kill} of 60 done)");
    eprintln!("killed with {at_kill} of 60 ShadowPods made");
    let mut agent = spawn_agent(consumer, port)?;
    assert_exact(&c, &p, ns, &twin, 60).await?;

    // A burst of deletions, killed midway.
    deps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 20}})),
    )
    .await?;
    wait_for(
        Api::<ShadowPod>::namespaced(p.clone(), &twin),
        watcher::Config::default(),
        "remote deletions under way",
        WAIT,
        |r| r.len() <= 50,
    )
    .await?;
    kill9(&mut agent).await?;
    let left = Api::<ShadowPod>::namespaced(p.clone(), &twin)
        .list(&ListParams::default())
        .await?
        .items
        .len();
    eprintln!("killed with {left} ShadowPods left (target 20)");
    let mut agent = spawn_agent(consumer, port)?;
    assert_exact(&c, &p, ns, &twin, 20).await?;
    kill9(&mut agent).await?;
    provider_agent.abort();
    Ok(())
}
