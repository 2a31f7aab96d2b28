//! Provider safety: a consumer runs nothing on a provider that the provider's pod security level
//! forbids, sees why on its own pod, and a provider whose admin chose `privileged` runs it all.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HostPathVolumeSource, PodSpec, PodTemplateSpec,
    SeccompProfile, SecurityContext, Volume,
};
use kube::{
    Resource,
    api::PostParams,
    runtime::events::{Recorder, Reporter},
};
use liqo_vk::{
    pods::{OFFLOADING_ADMITTED, REASON_REFUSED},
    security,
    shadow::{self, ShadowPodSpec},
};

use super::*;

/// The host-access pods of the issue, plus a capability beyond baseline and a host port:
/// `(name, spec, the field the policy's refusal names, what Pod Security Admission's names)`.
/// Which of the two refuses depends on timing alone: a policy takes effect a moment after the
/// agent applies it, and until then Pod Security Admission refuses the pod on the provider.
fn host_access_pods() -> Vec<(&'static str, PodSpec, &'static str, &'static str)> {
    let base = pod_spec("busybox");
    let with_sc = |sc: SecurityContext| {
        let mut s = base.clone();
        s.containers[0].security_context = Some(sc);
        s
    };
    vec![
        (
            "host-network",
            PodSpec {
                host_network: Some(true),
                ..base.clone()
            },
            "spec.template.spec.hostNetwork",
            "hostNetwork=true",
        ),
        (
            "host-pid",
            PodSpec {
                host_pid: Some(true),
                ..base.clone()
            },
            "spec.template.spec.hostPID",
            "hostPID=true",
        ),
        (
            "privileged",
            with_sc(SecurityContext {
                privileged: Some(true),
                ..SecurityContext::default()
            }),
            "securityContext.privileged of container(s) app",
            "securityContext.privileged=true",
        ),
        (
            "host-path",
            PodSpec {
                volumes: Some(vec![Volume {
                    name: "root".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: "/".into(),
                        type_: None,
                    }),
                    ..Volume::default()
                }]),
                ..base.clone()
            },
            "spec.template.spec.volumes root: hostPath",
            "hostPath volumes (volume \"root\")",
        ),
        (
            "sys-admin",
            with_sc(SecurityContext {
                capabilities: Some(Capabilities {
                    add: Some(vec!["SYS_ADMIN".into()]),
                    drop: None,
                }),
                ..SecurityContext::default()
            }),
            "securityContext.capabilities.add of container(s) app",
            "SYS_ADMIN",
        ),
        (
            "host-port",
            PodSpec {
                containers: vec![Container {
                    ports: Some(vec![ContainerPort {
                        container_port: 80,
                        host_port: Some(8080),
                        ..ContainerPort::default()
                    }]),
                    ..base.containers[0].clone()
                }],
                ..base.clone()
            },
            "ports[].hostPort of container(s) app",
            "hostPort 8080",
        ),
    ]
}

fn pod(name: &str, spec: PodSpec) -> Pod {
    Pod {
        metadata: meta(name),
        spec: Some(spec),
        status: None,
    }
}

fn admission(p: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == OFFLOADING_ADMITTED)
}

async fn offload_to(c: &Client, ns: &str, region: &str) -> TestResult {
    let mut s = spec(PodOffloadingStrategy::Remote);
    s.cluster_selector = Some(select(ResourceOffer::REGION, region));
    offload(c, ns, s).await?;
    wait_offloading(c, ns, "Ready").await?;
    Ok(())
}

#[tokio::test]
async fn host_access_is_refused_by_a_baseline_provider_and_runs_on_a_privileged_one() -> TestResult
{
    let lab = env().await;
    let (c, pa, pb) = clients(lab);
    offload_to(&c, "psa-base", "eu-west").await?; // provider-a: baseline
    offload_to(&c, "psa-priv", "eu-south").await?; // provider-b: privileged

    // The twin namespaces carry the level, pinned to the provider's version.
    for (client, ns, level) in [
        (&pa, "psa-base", "baseline"),
        (&pb, "psa-priv", "privileged"),
    ] {
        let n = Api::<Namespace>::all(client.clone()).get(&twin(ns)).await?;
        let l = n.labels();
        for mode in ["enforce", "warn", "audit"] {
            assert_eq!(
                l.get(&format!("pod-security.kubernetes.io/{mode}"))
                    .map(String::as_str),
                Some(level),
                "{mode} on {}",
                twin(ns)
            );
            assert_eq!(
                l.get(&format!("pod-security.kubernetes.io/{mode}-version"))
                    .map(String::as_str),
                Some("v1.34")
            );
        }
    }

    // The policy takes effect a moment after the agent applied it; from then on a forbidden
    // ShadowPod is refused when written (before, Pod Security Admission refuses its pod).
    let kc = kubeconfig(
        cluster(lab, PROVIDER_A),
        &liqo_core::names::consumer_user(&id(CONSUMER)),
        &liqo_core::names::tenant_namespace(&id(CONSUMER)),
    )?;
    let as_consumer = liqo_core::client_from_kubeconfig(&id(PROVIDER_A), &kc).await?;
    let probe = shadow(
        "probe",
        PodSpec {
            host_pid: Some(true),
            ..pod_spec("busybox")
        },
    );
    liqo_lab::wait_until_refused(&as_consumer, &twin("psa-base"), &probe, WAIT).await?;

    let pods = host_access_pods();
    for ns in ["psa-base", "psa-priv"] {
        let api = Api::<Pod>::namespaced(c.clone(), ns);
        for (name, spec, ..) in &pods {
            create(&api, &pod(name, spec.clone())).await?;
        }
    }

    // Baseline: each local pod says why, naming the field and the provider.
    let base = Api::<Pod>::namespaced(c.clone(), "psa-base");
    for (name, _, field, psa_field) in &pods {
        let p = wait_one(base.clone(), name, "the refusal on the local pod", |p| {
            p.and_then(admission).is_some()
        })
        .await?
        .ok_or("pod vanished")?;
        let cond = admission(&p).ok_or("no condition")?;
        assert_eq!(cond.status, "False");
        assert_eq!(cond.reason.as_deref(), Some(REASON_REFUSED));
        let message = cond.message.clone().unwrap_or_default();
        assert!(
            message.starts_with("provider provider-a refused the pod: ")
                && message.contains("baseline")
                && (message.contains(field) || message.contains(psa_field)),
            "{name}: {message:?} does not name the provider, the level and {field:?} or {psa_field:?}"
        );
        let status = p.status.as_ref().ok_or("no status")?;
        assert_eq!(status.reason.as_deref(), Some(REASON_REFUSED), "{name}");
        assert_eq!(status.phase.as_deref(), Some("Pending"), "{name}");
    }
    // ... with an event each.
    let events = Api::<Event>::namespaced(c.clone(), "psa-base")
        .list(&ListParams::default())
        .await?;
    for (name, ..) in &pods {
        assert!(
            events
                .items
                .iter()
                .any(|e| e.involved_object.name.as_deref() == Some(name)
                    && e.reason.as_deref() == Some(REASON_REFUSED)),
            "no {REASON_REFUSED} event for {name}"
        );
    }
    // Nothing reached the provider: no ShadowPod, no pod.
    let remote = twin("psa-base");
    assert!(
        Api::<ShadowPod>::namespaced(pa.clone(), &remote)
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
    );
    assert!(
        Api::<Pod>::namespaced(pa.clone(), &remote)
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
    );

    // Privileged: the admin's choice is honoured, host access included.
    wait_for(
        Api::<Pod>::namespaced(c.clone(), "psa-priv"),
        watcher::Config::default(),
        "every host-access pod running on the privileged provider",
        WAIT,
        // A host-network pod has the provider node's address, which no mapping translates: the
        // phase is what counts here.
        |ps| {
            ps.len() == pods.len()
                && ps.iter().all(|p| {
                    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                        && admission(p).is_none()
                })
        },
    )
    .await?;
    let hn = Api::<Pod>::namespaced(pb.clone(), &twin("psa-priv"))
        .get("host-network")
        .await?;
    assert_eq!(hn.spec.and_then(|s| s.host_network), Some(true));
    Ok(())
}

fn shadow(name: &str, spec: PodSpec) -> ShadowPod {
    ShadowPod {
        metadata: meta(name),
        spec: ShadowPodSpec {
            template: PodTemplateSpec {
                metadata: None,
                spec: Some(spec),
            },
        },
        status: None,
    }
}

#[tokio::test]
async fn a_consumer_writing_a_forbidden_shadow_pod_is_refused_naming_the_field() -> TestResult {
    let lab = env().await;
    let (c, _, _) = clients(lab);
    offload_to(&c, "psa-direct", "eu-west").await?;
    let tenant = liqo_core::names::tenant_namespace(&id(CONSUMER));
    let kc = kubeconfig(
        cluster(lab, PROVIDER_A),
        &liqo_core::names::consumer_user(&id(CONSUMER)),
        &tenant,
    )?;
    let remote = liqo_core::client_from_kubeconfig(&id(PROVIDER_A), &kc).await?;
    let api = Api::<ShadowPod>::namespaced(remote.clone(), &twin("psa-direct"));
    let mut pinned = pod_spec("busybox");
    pinned.node_name = Some("some-node".into());
    let refused = [
        (
            "direct-host-network",
            PodSpec {
                host_network: Some(true),
                ..pod_spec("busybox")
            },
            "spec.template.spec.hostNetwork: host networking is not allowed by the pod security level \"baseline\"",
        ),
        ("direct-pinned", pinned, "spec.template.spec.nodeName"),
    ];
    for (name, spec, field) in refused {
        let s =
            liqo_lab::wait_until_refused(&remote, &twin("psa-direct"), &shadow(name, spec), WAIT)
                .await?;
        assert_eq!(s.code, 403, "{name}: {s:?}");
        assert!(s.message.contains(field), "{name}: {:?}", s.message);
    }
    // An ordinary one is accepted.
    api.create(
        &PostParams::default(),
        &shadow("direct-plain", pod_spec("busybox")),
    )
    .await?;
    api.delete("direct-plain", &DeleteParams::default()).await?;

    // Services: no external IPs (they capture traffic on every provider node), no node ports
    // below privileged.
    let services = Api::<Service>::namespaced(remote.clone(), &twin("psa-direct"));
    let service = |name: &str, type_: &str, external: Option<&str>| Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            external_ips: external.map(|ip| vec![ip.to_owned()]),
            ports: Some(vec![ServicePort {
                port: 80,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    for (svc, field) in [
        (
            service("capture", "ClusterIP", Some("192.0.2.10")),
            "spec.externalIPs",
        ),
        (service("exposed", "NodePort", None), "spec.type: NodePort"),
    ] {
        let s = liqo_lab::wait_until_refused(&remote, &twin("psa-direct"), &svc, WAIT).await?;
        assert!(s.message.contains(field), "{:?}", s.message);
    }
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    services
        .create(&dry, &service("plain", "ClusterIP", None))
        .await?;
    Ok(())
}

/// A pod `restricted` admits.
fn hardened() -> PodSpec {
    let mut s = pod_spec("busybox");
    s.containers[0].security_context = Some(SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        capabilities: Some(Capabilities {
            add: None,
            drop: Some(vec!["ALL".into()]),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    });
    s
}

/// Creates `obj` as a dry run until the API server accepts it (a namespace's new label reaches
/// admission policies a moment later).
async fn accepted_eventually(api: &Api<ShadowPod>, obj: &ShadowPod) -> TestResult {
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match api.create(&dry, obj).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("still refused after {WAIT:?}: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn the_policy_follows_the_namespace_level_and_reports_a_level_change() -> TestResult {
    let lab = env().await;
    let (_, pa, _) = clients(lab);
    let ns = "psa-levels";
    let set_level = |level: Option<&'static str>| {
        let pa = pa.clone();
        async move {
            let patch = serde_json::json!({"metadata": {"labels": {
                labels::REMOTE_CLUSTER_ID: "someone",
                "pod-security.kubernetes.io/enforce": level,
            }}});
            Api::<Namespace>::all(pa)
                .patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    ensure_namespace(&pa, ns, &[]).await?;
    let api = Api::<ShadowPod>::namespaced(pa.clone(), ns);
    let host = shadow(
        "host",
        PodSpec {
            host_network: Some(true),
            ..pod_spec("busybox")
        },
    );
    let refused = |obj: ShadowPod| {
        let pa = pa.clone();
        async move {
            liqo_lab::wait_until_refused(&pa, ns, &obj, WAIT)
                .await
                .map(|s| s.message)
        }
    };

    // Restricted: a hardened pod passes; a plain one is refused for each missing setting.
    set_level(Some("restricted")).await?;
    let plain = refused(shadow("plain", pod_spec("busybox"))).await?;
    assert!(
        plain.contains("allowPrivilegeEscalation of container(s) app")
            && plain.contains("\"restricted\""),
        "{plain}"
    );
    let mut root = hardened();
    root.containers[0]
        .security_context
        .as_mut()
        .ok_or("no context")?
        .run_as_user = Some(0);
    let root = refused(shadow("root", root)).await?;
    assert!(root.contains("runAsUser: 0"), "{root}");
    api.create(&PostParams::default(), &shadow("hardened", hardened()))
        .await?;

    // Privileged admits host access.
    set_level(Some("privileged")).await?;
    accepted_eventually(&api, &host).await?;
    api.create(&PostParams::default(), &host).await?;
    let pods = Api::<Pod>::namespaced(pa.clone(), ns);
    wait_one(pods.clone(), "host", "the host pod made", |p| p.is_some()).await?;

    // A twin namespace without a level is held to restricted.
    set_level(None).await?;
    let unlabelled = refused(shadow("plain", pod_spec("busybox"))).await?;
    assert!(unlabelled.contains("\"restricted\""), "{unlabelled}");

    // Down to baseline: the check reports the ShadowPod it would refuse now, and only that one.
    set_level(Some("baseline")).await?;
    refused(shadow(
        "host-2",
        host.spec.template.spec.clone().ok_or("no spec")?,
    ))
    .await?;
    let recorder = Recorder::new(pa.clone(), Reporter::from("liqo-vk-test".to_owned()));
    security::report_existing(&pa, &recorder, ns).await?;
    let host = api.get("host").await?;
    let (reason, message) = shadow::refusal(&host).ok_or("host not reported")?;
    assert_eq!(reason, shadow::REASON_LEVEL_CHANGED);
    assert!(
        message.contains("would be refused now") && message.contains("hostNetwork"),
        "{message}"
    );
    assert_eq!(shadow::refusal(&api.get("hardened").await?), None);
    let events = Api::<Event>::namespaced(pa.clone(), ns)
        .list(&ListParams::default())
        .await?;
    assert!(events.items.iter().any(|e| {
        e.involved_object.uid == host.meta().uid
            && e.reason.as_deref() == Some(shadow::REASON_LEVEL_CHANGED)
    }));
    // Back to privileged: the report goes away.
    set_level(Some("privileged")).await?;
    accepted_eventually(
        &api,
        &shadow("host-2", host.spec.template.spec.clone().ok_or("no spec")?),
    )
    .await?;
    security::report_existing(&pa, &recorder, ns).await?;
    assert_eq!(shadow::refusal(&api.get("host").await?), None);

    // Stricter again and the pod lost (evicted, deleted): Pod Security Admission refuses to
    // make it again, and the ShadowPod says so.
    set_level(Some("baseline")).await?;
    refused(shadow(
        "host-2",
        host.spec.template.spec.clone().ok_or("no spec")?,
    ))
    .await?;
    pods.delete("host", &DeleteParams::default().grace_period(0))
        .await?;
    let host = wait_one(
        api.clone(),
        "host",
        "the pod's refusal on the ShadowPod",
        |sp| {
            sp.and_then(shadow::refusal)
                .is_some_and(|(reason, _)| reason == shadow::REASON_POD_SECURITY)
        },
    )
    .await?
    .ok_or("ShadowPod vanished")?;
    let (_, message) = shadow::refusal(&host).ok_or("no refusal")?;
    assert!(message.contains("hostNetwork=true"), "{message}");

    Api::<Namespace>::all(pa)
        .delete(ns, &DeleteParams::default())
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_running_pod_the_provider_would_refuse_now_says_so_on_the_consumer() -> TestResult {
    let lab = env().await;
    let (c, pa, _) = clients(lab);
    let ns = "psa-later";
    offload_to(&c, ns, "eu-west").await?;
    let pods = Api::<Pod>::namespaced(c.clone(), ns);
    create(&pods, &pod("web", pod_spec("busybox"))).await?;
    wait_one(pods.clone(), "web", "the pod running remotely", |p| {
        p.is_some_and(running)
    })
    .await?;
    // What the provider's agent writes when a stricter level would refuse the running pod.
    let shadows = Api::<ShadowPod>::namespaced(pa.clone(), &twin(ns));
    let report = |conditions: serde_json::Value| {
        let shadows = shadows.clone();
        async move {
            shadows
                .patch_status(
                    "web",
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"status": {"conditions": conditions}})),
                )
                .await
        }
    };
    report(serde_json::json!([{
        "type": shadow::ADMITTED, "status": "False", "reason": shadow::REASON_LEVEL_CHANGED,
        "message": "the running pod would be refused now: (test)",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]))
    .await?;
    let p = wait_one(pods.clone(), "web", "the report on the local pod", |p| {
        p.and_then(admission).is_some()
    })
    .await?
    .ok_or("pod vanished")?;
    let cond = admission(&p).ok_or("no condition")?;
    assert_eq!(cond.reason.as_deref(), Some(shadow::REASON_LEVEL_CHANGED));
    assert!(
        cond.message.as_deref().is_some_and(|m| m.starts_with(
            "provider provider-a refused the pod: the running pod would be refused now"
        )),
        "{cond:?}"
    );
    assert!(running(&p), "the pod keeps running: {p:?}");
    // The level relaxed again: the report goes.
    report(serde_json::json!([])).await?;
    wait_one(pods, "web", "the report gone from the local pod", |p| {
        p.is_some_and(|p| admission(p).is_none())
    })
    .await?;
    Ok(())
}
