//! # custom-reflector
//!
//! A reflector provider written the way a user of liqo-rs would write one, outside the SDK
//! crates: it offloads a custom resource of its own, [`Greeting`] (`greetings.example.com`), from
//! each offloaded namespace of the consumer to its twin namespace on the provider.
//!
//! Three pieces (README.md walks through them):
//!
//! 1. [`Greetings`]: what a Greeting becomes on the provider ([`liqo_vk::reflection::Reflect`]).
//!    The generic engine ([`liqo_vk::reflection::Reflector`]) does the watching, queueing,
//!    retries, server-side apply and deletions. Greetings it refuses (an empty message) are
//!    reported as a Warning Event `InvalidGreeting` on the consumer's object.
//! 2. [`GreetingReflector`]: the [`ResourceReflector`] the agent runs for every offloaded
//!    namespace pair, with a [`cleanup`](ResourceReflector::cleanup) that removes the twins it
//!    made when the namespace stops being offloaded.
//! 3. [`offloading_cluster_role`]: what the *provider's* admin installs so that consumers may
//!    write Greetings in their twin namespaces (ClusterRole aggregation into `liqo-offloading`).
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), liqo_vk::VkError> {
//! let agent = liqo_vk::ConsumerAgent::builder(client, "milan".parse().unwrap())
//!     .reflector(custom_reflector::GreetingReflector::new())
//!     .build();
//! agent.run(std::future::pending()).await
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use async_trait::async_trait;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::{
    Api, CustomResource, Resource,
    api::{DeleteParams, ListParams, ObjectMeta},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use liqo_core::{ReflectionDirection, ReflectionError, ReflectionScope, ResourceReflector};
use liqo_vk::reflection::{Reflect, Reflector, TransformError, clean_metadata};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A greeting to deliver in a namespace.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "example.com",
    version = "v1",
    kind = "Greeting",
    plural = "greetings",
    namespaced
)]
pub struct GreetingSpec {
    /// What to say. Greetings with an empty message are not reflected.
    pub message: String,
    /// Who to say it to (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// The name of this reflector: the `liqo.io/reflector` label value of the twins it makes.
pub const REFLECTOR_NAME: &str = "greeting";

/// The reason of the Warning Event a refused Greeting gets.
pub const INVALID_REASON: &str = "InvalidGreeting";

/// Greetings, consumer to provider: the same spec under clean metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct Greetings;

impl Greetings {
    fn check(g: &Greeting) -> Result<(), TransformError> {
        if g.spec.message.trim().is_empty() {
            return Err(TransformError::new(format!(
                "Greeting {}/{}: spec.message is empty; an empty greeting is not reflected",
                g.metadata.namespace.as_deref().unwrap_or_default(),
                g.metadata.name.as_deref().unwrap_or_default(),
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Reflect for Greetings {
    type Source = Greeting;
    type Target = Greeting;

    fn name(&self) -> &str {
        REFLECTOR_NAME
    }

    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }

    fn transform(
        &self,
        g: &Greeting,
        _: &ReflectionScope,
    ) -> Result<Option<Greeting>, TransformError> {
        Self::check(g)?;
        Ok(Some(Greeting {
            metadata: clean_metadata(&g.metadata),
            spec: g.spec.clone(),
        }))
    }

    /// As [`transform`](Reflect::transform), and a refused Greeting is also reported where its
    /// author looks: a Warning Event on it (`kubectl describe greeting`). The engine retries it
    /// with backoff, so a fixed Greeting goes through.
    async fn desired(
        &self,
        g: &Greeting,
        _existing: Option<&Greeting>,
        scope: &ReflectionScope,
    ) -> Result<Option<Greeting>, TransformError> {
        if let Err(e) = Self::check(g) {
            let recorder = Recorder::new(
                scope.local.clone(),
                Reporter {
                    controller: "custom-reflector".into(),
                    instance: None,
                },
            );
            let event = Event {
                type_: EventType::Warning,
                reason: INVALID_REASON.into(),
                note: Some(format!(
                    "not reflected to {}/{}: {}",
                    scope.remote_cluster, scope.remote_namespace, e.reason
                )),
                action: "Reflect".into(),
                secondary: None,
            };
            if let Err(err) = recorder.publish(&event, &g.object_ref(&())).await {
                tracing::debug!(error = %err, "publishing the InvalidGreeting event failed");
            }
            return Err(e);
        }
        self.transform(g, scope)
    }
}

/// The provider the agent runs: liqo-vk's engine for [`Greetings`], plus a cleanup that removes
/// the twins it made (normally they go with the twin namespace; removing them explicitly also
/// covers a twin namespace that outlives the offloading).
#[derive(Debug)]
pub struct GreetingReflector {
    engine: Reflector<Greetings>,
}

impl GreetingReflector {
    /// The reflector, with the engine's default tunables.
    pub fn new() -> Self {
        Self {
            engine: Reflector::new(Greetings),
        }
    }
}

impl Default for GreetingReflector {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ResourceReflector for GreetingReflector {
    fn kind(&self) -> &str {
        self.engine.kind()
    }

    fn direction(&self) -> ReflectionDirection {
        ReflectionDirection::LocalToRemote
    }

    async fn reflect(
        &self,
        scope: ReflectionScope,
        shutdown: CancellationToken,
    ) -> Result<(), ReflectionError> {
        self.engine.reflect(scope, shutdown).await
    }

    async fn cleanup(&self, scope: &ReflectionScope) -> Result<(), ReflectionError> {
        let api: Api<Greeting> = Api::namespaced(scope.remote.clone(), &scope.remote_namespace);
        let lp = ListParams::default().labels(&format!(
            "{}={REFLECTOR_NAME}",
            liqo_vk::names::REFLECTOR_LABEL
        ));
        match api.delete_collection(&DeleteParams::default(), &lp).await {
            Ok(_) => Ok(()),
            // The twin namespace (or the CRD) is already gone: nothing left to remove.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(source) => Err(ReflectionError::Kube {
                kind: "Greeting".into(),
                namespace: scope.remote_namespace.clone(),
                name: String::new(),
                source,
            }),
        }
    }
}

/// For the provider's admin: lets consumers manage Greetings in their twin namespaces, by
/// joining liqo-vk's `liqo-offloading` ClusterRole through the
/// [`liqo.io/aggregate-to-offloading=true`](liqo_vk::AGGREGATE_TO_OFFLOADING) label.
pub fn offloading_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta {
            name: Some("liqo-offloading-greetings".into()),
            labels: Some(
                [(
                    liqo_vk::AGGREGATE_TO_OFFLOADING.to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["example.com".into()]),
            resources: Some(vec!["greetings".into()]),
            // What the engine needs on the target side: watch its twins, apply and delete them.
            verbs: [
                "get",
                "list",
                "watch",
                "create",
                "update",
                "patch",
                "delete",
                "deletecollection",
            ]
            .map(String::from)
            .to_vec(),
            ..PolicyRule::default()
        }]),
        aggregation_rule: None,
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    #[test]
    fn the_crd_is_namespaced_in_example_com() {
        let crd = Greeting::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("greetings.example.com"));
        assert_eq!(crd.spec.scope, "Namespaced");
    }

    #[test]
    fn empty_messages_are_refused_with_the_object_named() {
        let mut g = Greeting::new(
            "hi",
            GreetingSpec {
                message: "  ".into(),
                to: None,
            },
        );
        g.metadata.namespace = Some("shop".into());
        let e = Greetings::check(&g).unwrap_err();
        assert!(e.reason.contains("shop/hi"), "{}", e.reason);
        g.spec.message = "hello".into();
        assert!(Greetings::check(&g).is_ok());
    }

    #[test]
    fn the_role_joins_liqo_offloading() {
        let role = offloading_cluster_role();
        let labels = role.metadata.labels.unwrap();
        assert_eq!(labels[liqo_vk::AGGREGATE_TO_OFFLOADING], "true");
        let selector = liqo_vk::offloading_cluster_role()
            .aggregation_rule
            .unwrap()
            .cluster_role_selectors
            .unwrap();
        assert!(selector.iter().any(|s| {
            s.match_labels
                .as_ref()
                .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        }));
    }
}
