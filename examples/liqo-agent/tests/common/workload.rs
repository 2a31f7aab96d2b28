//! The workload of the data-plane tests: a Deployment `web` answering HTTP on 8080 from the
//! lab's data plane, a client pod at home, server-side apply, and reading the answers.
#![allow(dead_code)] // Each test binary uses what it needs.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{Container, ContainerPort, Pod, PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use liqo_lab::NETNS_LABEL;
use serde::de::DeserializeOwned;

use super::{Error, FIELD_MANAGER};

/// `key=value` from the data plane's one-line answer.
pub fn field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Deployment `web` in `namespace`: pods the lab gives a network namespace and an HTTP server.
pub fn web_deployment(namespace: &str, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([
        ("app".to_owned(), "web".to_owned()),
        (NETNS_LABEL.to_owned(), "true".to_owned()),
    ]);
    Deployment {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "web".into(),
                        image: Some("ghcr.io/liqo-rs/hello:test".into()),
                        ports: Some(vec![ContainerPort {
                            container_port: 8080,
                            ..ContainerPort::default()
                        }]),
                        ..Container::default()
                    }],
                    termination_grace_period_seconds: Some(1),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Pod `default/client` at home, with a network namespace of the lab's data plane.
pub fn client_pod() -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("client".into()),
            namespace: Some("default".into()),
            labels: Some(BTreeMap::from([(
                NETNS_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "client".into(),
                image: Some("ghcr.io/liqo-rs/client:test".into()),
                ..Container::default()
            }],
            termination_grace_period_seconds: Some(1),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// Server-side apply of `obj` through `api`.
pub async fn apply<K>(api: &Api<K>, name: &str, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}
