//! The data plane against a real lab: pod namespaces with the pod IPs kwok assigned, HTTP between
//! pods through the cluster's gateway, removal on scale-down and on stop.

use std::{collections::BTreeMap, process::Command, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Container, ContainerPort, Pod, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use liqo_lab::{ClusterSpec, DataPlane, LabSpec, NETNS_LABEL, WorkerSpec};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const WAIT: Duration = Duration::from_secs(90);

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_names() -> Vec<String> {
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn host_links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
        .collect()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([
        ("app".to_owned(), name.to_owned()),
        (NETNS_LABEL.to_owned(), "true".to_owned()),
    ]);
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "web".to_owned(),
                        image: Some("example.invalid/web:1".to_owned()),
                        ports: Some(vec![ContainerPort {
                            container_port: 9090,
                            ..ContainerPort::default()
                        }]),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[tokio::test]
async fn pods_get_namespaces_and_talk_through_the_gateway() -> TestResult {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "liqo_lab=info".into()),
        )
        .with_test_writer()
        .try_init();
    let lab = liqo_lab::shared(|| {
        LabSpec::new([ClusterSpec::new("dp").workers(2, WorkerSpec::new("2", "4Gi", 20))])
    })
    .await?;
    let links_before = host_links();
    let dp = DataPlane::start(lab).await?;
    let prefix = format!("liqo-{}-", dp.id());
    let gw = dp.gateway("dp").ok_or("no gateway for cluster dp")?.clone();
    assert!(gw.netns_path.exists(), "{}", gw.netns_path.display());
    assert_eq!(gw.wan_address.to_string(), "192.168.240.1");
    assert!(ip(&["-n", &gw.netns, "-4", "addr", "show", "wan0"]).contains("192.168.240.1/24"));
    assert!(netns_names().contains(&dp.wan_netns().to_owned()));
    let twice = DataPlane::start(lab)
        .await
        .expect_err("one data plane per lab");
    assert!(twice.to_string().contains("already running"), "{twice}");

    let client = lab.cluster("dp").ok_or("no cluster dp")?.client()?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(&PostParams::default(), &deployment("web", 2))
        .await?;

    let nets = dp
        .wait_pods(WAIT, |p| {
            p.iter().filter(|n| n.name.starts_with("web-")).count() == 2
        })
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let listed = pods.list(&ListParams::default().labels("app=web")).await?;
    for net in &nets {
        // The namespace carries the IP the control plane assigned.
        let pod = listed
            .items
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(net.name.as_str()))
            .ok_or_else(|| format!("pod {} not listed", net.name))?;
        let pod_ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or("no pod IP")?;
        assert_eq!(net.ip.to_string(), pod_ip);
        assert_eq!(net.port, 9090);
        assert!(net.netns.starts_with(&prefix));
        assert!(netns_names().contains(&net.netns), "{} missing", net.netns);
        let addr = ip(&["-n", &net.netns, "-4", "addr", "show", "eth0"]);
        assert!(addr.contains(&format!("{pod_ip}/32")), "{addr}");
        assert!(
            ip(&["-n", &gw.netns, "link", "show"]).contains(&net.gateway_interface),
            "gateway veth {} missing",
            net.gateway_interface
        );
    }

    // Pod 1 → pod 2 through the gateway: pod 2 answers, and sees pod 1's address.
    let (one, two) = (&nets[0], &nets[1]);
    let body = dp
        .http_get(
            "dp",
            "default",
            &one.name,
            &format!("http://{}:{}/hello", two.ip, two.port),
        )
        .await?;
    assert_eq!(
        body.trim(),
        format!(
            "pod={} namespace=default cluster=dp ip={} client={}",
            two.name, two.ip, one.ip
        )
    );
    // A closed port fails with a clear error.
    let err = dp
        .http_get("dp", "default", &one.name, &format!("http://{}:1/", two.ip))
        .await
        .expect_err("port 1 is closed");
    assert!(err.to_string().contains("refused"), "{err}");
    let err = dp
        .http_get("dp", "default", "nope", "http://10.0.0.1/")
        .await
        .expect_err("no such pod");
    assert!(err.to_string().contains("no network namespace"), "{err}");

    // Scale to 1: the other pod's namespace goes away.
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
        )
        .await?;
    let left = dp
        .wait_pods(WAIT, |p| {
            p.iter().filter(|n| n.name.starts_with("web-")).count() == 1
        })
        .await?;
    let gone: Vec<_> = nets
        .iter()
        .filter(|n| !left.iter().any(|l| l.name == n.name))
        .collect();
    assert_eq!(gone.len(), 1);
    let names = netns_names();
    assert!(
        !names.contains(&gone[0].netns),
        "{} still there",
        gone[0].netns
    );
    assert!(
        !ip(&["-n", &gw.netns, "link", "show"])
            .contains(&format!("{}@", gone[0].gateway_interface)),
        "veth {} still there",
        gone[0].gateway_interface
    );
    assert!(names.contains(&left[0].netns));

    deployments.delete("web", &Default::default()).await?;
    dp.stop().await?;
    let ours: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(ours.is_empty(), "namespaces left: {ours:?}");
    let new_links: Vec<String> = host_links()
        .into_iter()
        .filter(|l| !links_before.contains(l))
        .filter(|l| l == "br0" || l == "wan0" || l == "eth0" || l.starts_with("gw"))
        .collect();
    assert!(
        new_links.is_empty(),
        "links left on the host: {new_links:?}"
    );

    // Dropping removes everything too (the remaining pod had its namespace again meanwhile).
    deployments
        .create(&PostParams::default(), &deployment("drop", 1))
        .await?;
    let dp = DataPlane::start(lab).await?;
    dp.wait_pods(WAIT, |p| p.iter().any(|n| n.name.starts_with("drop-")))
        .await?;
    assert!(netns_names().iter().any(|n| n.starts_with(&prefix)));
    drop(dp);
    let ours: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(ours.is_empty(), "namespaces left after drop: {ours:?}");
    deployments.delete("drop", &Default::default()).await?;
    Ok(())
}
