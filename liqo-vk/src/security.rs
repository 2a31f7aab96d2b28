//! What a consumer may run on a provider: the provider admin's Pod Security Standards level.
//!
//! Each twin namespace carries the Pod Security Admission labels of the level chosen for its
//! consumer ([`PodSecurity`]: a provider-wide default, `baseline` unless the admin says
//! otherwise, and per-consumer overrides), so the API server refuses a forbidden pod whoever
//! creates it, the provider's own agent included. The ValidatingAdmissionPolicy
//! [`POLICY_YAML`] checks the same level on the `ShadowPod` when the consumer writes it: a
//! forbidden spec is refused at once with the field named, and the consumer reports that on its
//! local pod instead of waiting for a pod that never comes.

use std::{collections::BTreeMap, fmt, str::FromStr};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
    runtime::events::Recorder,
};
use liqo_core::ClusterId;
use serde_json::json;

use crate::{
    VkError,
    error::{KubeContext, is_not_found},
    names::FIELD_MANAGER,
    shadow::{self, REASON_LEVEL_CHANGED, ShadowPod},
};

/// The ValidatingAdmissionPolicies and their bindings that hold what a consumer writes in its
/// twin namespaces to the namespace's level: ShadowPods (`liqo-shadowpod-security`) and
/// Services (`liqo-twin-service-guard`: no external IPs, no node ports below `privileged`).
/// Also in `deploy/shadowpod-security.yaml`.
pub const POLICY_YAML: &str = include_str!("shadowpod-security.yaml");

/// The Pod Security Admission label prefix.
const PSA: &str = "pod-security.kubernetes.io";

/// A Pod Security Standards level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PodSecurityLevel {
    /// Anything, host access included: only for consumers the provider trusts like its own admins.
    Privileged,
    /// No known privilege escalation: no host namespaces, ports or paths, no privileged
    /// containers, only the default capabilities.
    #[default]
    Baseline,
    /// Hardened: baseline plus non-root, no privilege escalation, seccomp, all capabilities
    /// dropped, and only ephemeral or claimed volume types.
    Restricted,
}

impl PodSecurityLevel {
    /// The level's name, as Pod Security Admission spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

impl fmt::Display for PodSecurityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown level name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown pod security level {0:?}: expected privileged, baseline or restricted")]
pub struct UnknownLevel(pub String);

impl FromStr for PodSecurityLevel {
    type Err = UnknownLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "privileged" => Ok(Self::Privileged),
            "baseline" => Ok(Self::Baseline),
            "restricted" => Ok(Self::Restricted),
            other => Err(UnknownLevel(other.to_owned())),
        }
    }
}

/// The levels a provider holds its consumers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSecurity {
    /// For every consumer without an override.
    pub default: PodSecurityLevel,
    /// Per consumer.
    pub per_consumer: BTreeMap<ClusterId, PodSecurityLevel>,
    /// The Pod Security Standards version the labels pin (`v1.34`, or `latest`); `None`: the
    /// provider API server's own minor version, read when the agent starts, so the rules do not
    /// change under the admin's feet when the cluster is upgraded.
    pub version: Option<String>,
}

impl PodSecurity {
    /// Every consumer held to `level`.
    pub fn new(level: PodSecurityLevel) -> Self {
        Self {
            default: level,
            ..Self::default()
        }
    }

    /// `consumer` held to `level` instead of the default.
    pub fn with_consumer(mut self, consumer: ClusterId, level: PodSecurityLevel) -> Self {
        self.per_consumer.insert(consumer, level);
        self
    }

    /// The level of `consumer`.
    pub fn level_for(&self, consumer: &ClusterId) -> PodSecurityLevel {
        self.per_consumer
            .get(consumer)
            .copied()
            .unwrap_or(self.default)
    }

    /// The Pod Security Admission labels of a twin namespace of `consumer`: the level enforced,
    /// and also warned about and audited, at `version`.
    pub fn namespace_labels(
        &self,
        consumer: &ClusterId,
        version: &str,
    ) -> BTreeMap<String, String> {
        let level = self.level_for(consumer).as_str();
        ["enforce", "warn", "audit"]
            .into_iter()
            .flat_map(|mode| {
                [
                    (format!("{PSA}/{mode}"), level.to_owned()),
                    (format!("{PSA}/{mode}-version"), version.to_owned()),
                ]
            })
            .collect()
    }
}

/// The level a namespace's labels enforce, if any.
pub fn enforced_level(labels: &BTreeMap<String, String>) -> Option<&str> {
    labels.get(&format!("{PSA}/enforce")).map(String::as_str)
}

/// The version to pin: the configured one, or the API server's `v<major>.<minor>`.
pub(crate) async fn resolve_version(
    security: &PodSecurity,
    client: &kube::Client,
) -> Result<String, VkError> {
    if let Some(v) = &security.version {
        return Ok(v.clone());
    }
    let info = client
        .apiserver_version()
        .await
        .ctx(|| "reading the API server's version".to_owned())?;
    // Minor versions of managed clusters can read "34+".
    let minor: String = info
        .minor
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if minor.is_empty() {
        return Ok("latest".to_owned());
    }
    Ok(format!("v{}.{minor}", info.major))
}

/// The policy objects of [`POLICY_YAML`].
pub fn policy_objects() -> Result<Vec<DynamicObject>, VkError> {
    POLICY_YAML
        .split("\n---\n")
        .map(|doc| {
            serde_yaml_ng::from_str::<DynamicObject>(doc).map_err(|e| VkError::Invalid {
                object: "the ShadowPod security policy".to_owned(),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Applies the policies of [`POLICY_YAML`] and their bindings.
pub(crate) async fn install_policy(client: &kube::Client) -> Result<(), VkError> {
    for obj in policy_objects()? {
        let kind = obj
            .types
            .as_ref()
            .map(|t| t.kind.clone())
            .unwrap_or_default();
        let gvk = GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", &kind);
        let lower = kind.to_lowercase();
        let plural = match lower.strip_suffix('y') {
            Some(stem) => format!("{stem}ies"),
            None => format!("{lower}s"),
        };
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &ApiResource::from_gvk_with_plural(&gvk, &plural),
        );
        let name = obj.name_any();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .ctx(|| format!("applying {kind} {name}"))?;
    }
    Ok(())
}

/// After a twin namespace's level changed: asks the API server, by a dry-run update of each
/// ShadowPod in `namespace`, whether the policy still admits it, and reports each that it would
/// refuse now (status condition [`ADMITTED`](crate::shadow::ADMITTED) `False`, an event; the pod
/// keeps running, as Pod Security Admission leaves running pods alone). One rule set: the
/// policy itself answers, nothing here repeats it.
pub async fn report_existing(
    client: &kube::Client,
    recorder: &Recorder,
    namespace: &str,
) -> Result<(), VkError> {
    let api: Api<ShadowPod> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default())
        .await
        .ctx(|| format!("listing ShadowPods in {namespace}"))?;
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let touch = json!({"metadata": {"annotations": {CHECKED_AT: Timestamp::now().to_string()}}});
    for sp in list {
        let name = sp.name_any();
        let refusal = match api.patch(&name, &dry_run, &Patch::Merge(&touch)).await {
            Ok(_) => None,
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => Some(format!(
                "the running pod would be refused now: {}",
                refusal_reason(&s.message)
            )),
            Err(e) if is_not_found(&e) => continue,
            Err(e) => {
                return Err(VkError::kube(
                    format!("checking ShadowPod {namespace}/{name}"),
                    e,
                ));
            }
        };
        if let Some(message) = &refusal {
            tracing::warn!(namespace, shadow_pod = %name, %message, "offloaded pod no longer admitted");
            let about = sp.object_ref(&());
            crate::events::warn(
                recorder,
                &about,
                REASON_LEVEL_CHANGED,
                "CheckPodSecurity",
                message,
            )
            .await;
        }
        // A refusal of another kind (the pod could not be made) is the ShadowPod controller's.
        let ours = shadow::refusal(&sp).is_none_or(|(reason, _)| reason == REASON_LEVEL_CHANGED);
        if ours {
            shadow::set_refusal(
                client,
                &sp,
                refusal.as_deref().map(|m| (REASON_LEVEL_CHANGED, m)),
            )
            .await?;
        }
    }
    Ok(())
}

/// Annotation a dry-run check writes (never stored).
const CHECKED_AT: &str = "liqo.io/pod-security-checked-at";

/// What the API server says when a policy refuses an object, without its preamble
/// (`… ValidatingAdmissionPolicy 'x' with binding 'y' denied request: `).
pub fn refusal_reason(message: &str) -> &str {
    message
        .split_once("denied request: ")
        .map_or(message, |(_, rest)| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_print() {
        for l in [
            PodSecurityLevel::Privileged,
            PodSecurityLevel::Baseline,
            PodSecurityLevel::Restricted,
        ] {
            assert_eq!(l.as_str().parse::<PodSecurityLevel>().ok(), Some(l));
        }
        let e = "Baseline".parse::<PodSecurityLevel>().unwrap_err();
        assert!(e.to_string().contains("\"Baseline\""), "{e}");
        assert_eq!(PodSecurityLevel::default(), PodSecurityLevel::Baseline);
    }

    #[test]
    fn per_consumer_levels_override_the_default() {
        let rome = "rome".parse::<ClusterId>().unwrap();
        let turin = "turin".parse::<ClusterId>().unwrap();
        let s = PodSecurity::new(PodSecurityLevel::Restricted)
            .with_consumer(rome.clone(), PodSecurityLevel::Privileged);
        assert_eq!(s.level_for(&rome), PodSecurityLevel::Privileged);
        assert_eq!(s.level_for(&turin), PodSecurityLevel::Restricted);
        let labels = s.namespace_labels(&turin, "v1.34");
        assert_eq!(labels.len(), 6);
        assert_eq!(enforced_level(&labels), Some("restricted"));
        assert_eq!(
            labels.get("pod-security.kubernetes.io/audit-version"),
            Some(&"v1.34".to_owned())
        );
        assert_eq!(
            labels.get("pod-security.kubernetes.io/warn"),
            Some(&"restricted".to_owned())
        );
    }

    #[test]
    fn the_policies_parse_each_with_its_binding() {
        let objs = policy_objects().unwrap();
        assert_eq!(objs.len(), 4);
        for pair in objs.chunks(2) {
            let kinds: Vec<_> = pair
                .iter()
                .map(|o| o.types.as_ref().unwrap().kind.clone())
                .collect();
            assert_eq!(
                kinds,
                [
                    "ValidatingAdmissionPolicy",
                    "ValidatingAdmissionPolicyBinding"
                ]
            );
            assert_eq!(
                pair[1].data["spec"]["policyName"],
                pair[0].metadata.name.clone().unwrap()
            );
        }
    }

    #[test]
    fn refusal_reasons_lose_the_preamble() {
        let m = "shadowpods.liqo.io \"web\" is forbidden: ValidatingAdmissionPolicy 'liqo-shadowpod-security' with binding 'liqo-shadowpod-security' denied request: spec.template.spec.hostNetwork: host networking is not allowed";
        assert_eq!(
            refusal_reason(m),
            "spec.template.spec.hostNetwork: host networking is not allowed"
        );
        assert_eq!(refusal_reason("other"), "other");
    }
}
