//! Shared by the agent tests: installs what `deploy/` installs (the CRDs, the namespace, the
//! ServiceAccount with its least-privilege RBAC and the admission guard) as the admin, hands out
//! a kubeconfig for the agent's ServiceAccount, and finds the API server's refusals in an agent's
//! log (the agents log a refusal and retry, so a flow can end well while a step was refused).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::{
    api::{
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        core::v1::Secret,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    discovery::Scope,
};
use liqo_lab::Cluster;

/// The tests' error type.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// How long installing (and the authorizer and admission learning of it) may take.
const WAIT: Duration = Duration::from_secs(120);
const FIELD_MANAGER: &str = "liqo-agent-test";
/// The agent's ServiceAccount, as the API server names it.
const SA_USER: &str = "system:serviceaccount:liqo-system:liqo-agent";
/// Its groups but `system:authenticated`, which the API server adds itself.
const SA_GROUPS: [&str; 2] = [
    "system:serviceaccounts",
    "system:serviceaccounts:liqo-system",
];

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The documents of one manifest of `deploy/`, as JSON (comment-only documents skipped).
fn documents(file: &str) -> Result<Vec<serde_json::Value>, Error> {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = vec![];
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| format!("deploy/{file}, document {i}: {e}"))?;
        if v.is_null() {
            continue;
        }
        out.push(
            serde_json::to_value(&v).map_err(|e| format!("deploy/{file}, document {i}: {e}"))?,
        );
    }
    Ok(out)
}

/// Server-side applies one document of `file` for real.
async fn apply_doc(client: &Client, file: &str, doc: &serde_json::Value) -> Result<(), Error> {
    let obj: DynamicObject = serde_json::from_value(doc.clone())
        .map_err(|e| format!("deploy/{file}: not an object: {e}"))?;
    let types = obj
        .types
        .clone()
        .ok_or_else(|| format!("deploy/{file}: a document without apiVersion/kind"))?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), types.api_version.clone()),
    };
    let name = obj.name_any();
    let what = format!("deploy/{file}: {} {name}", types.kind);
    let gvk = GroupVersionKind::gvk(&group, &version, &types.kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj.metadata
                .namespace
                .as_deref()
                .ok_or_else(|| format!("{what} is namespaced but names no namespace"))?,
            &ar,
        ),
    };
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(doc),
    )
    .await
    .map_err(|e| format!("applying {what}: {e}"))?;
    Ok(())
}

/// Waits until the authorizer lets `sa` do it (it learns of roles and bindings through an
/// informer; there is nothing to watch from outside, hence the short retry).
async fn wait_until_allowed(sa: &Client, attrs: ResourceAttributes) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(attrs.clone()),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let answer = Api::<SelfSubjectAccessReview>::all(sa.clone())
            .create(&PostParams::default(), &review)
            .await?;
        if answer.status.is_some_and(|s| s.allowed) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the ServiceAccount was never allowed {attrs:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request per rule of `deploy/rbac.yaml` (its first verb, group, resource and name), in the
/// rule's namespace for a Role.
fn one_request_per_rule() -> Result<Vec<ResourceAttributes>, Error> {
    let first = |rule: &serde_json::Value, field: &str| -> Option<String> {
        rule[field].as_array()?.first()?.as_str().map(str::to_owned)
    };
    let mut out = vec![];
    for doc in documents("rbac.yaml")? {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind != "ClusterRole" && kind != "Role" {
            continue;
        }
        let namespace = doc["metadata"]["namespace"].as_str().map(str::to_owned);
        let role = doc["metadata"]["name"].as_str().unwrap_or_default();
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let (Some(verb), Some(group), Some(resource)) = (
                first(rule, "verbs"),
                first(rule, "apiGroups"),
                first(rule, "resources"),
            ) else {
                return Err(
                    format!("deploy/rbac.yaml: {kind} {role}: incomplete rule {rule}").into(),
                );
            };
            let (resource, subresource) = match resource.split_once('/') {
                Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
                None => (resource, None),
            };
            out.push(ResourceAttributes {
                verb: Some(verb),
                group: Some(group),
                resource: Some(resource),
                subresource,
                name: first(rule, "resourceNames"),
                namespace: namespace.clone(),
                ..ResourceAttributes::default()
            });
        }
    }
    Ok(out)
}

/// Waits until the admission guard (guard.yaml) is in force: it refuses the ServiceAccount a
/// Secret in kube-system (dry run).
async fn wait_for_guard(sa: &Client) -> Result<(), Error> {
    let probe = Secret {
        metadata: ObjectMeta {
            name: Some("liqo-guard-probe".into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    };
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Api::<Secret>::namespaced(sa.clone(), "kube-system")
            .create(&dry, &probe)
            .await
        {
            Err(kube::Error::Api(s)) if s.message.contains("liqo-agent-guard") => return Ok(()),
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => {
                return Err(
                    format!("the guard never refused a Secret in kube-system: {other:?}").into(),
                );
            }
        }
    }
}

/// On `cluster`, as the admin: installs the liqo CRDs (the agents run with `installCrds: false`,
/// as `deploy/config.yaml` does) and applies `deploy/namespace.yaml`, `deploy/rbac.yaml` and
/// `deploy/guard.yaml`; waits until the authorizer grants every rule of the RBAC and the guard is
/// in force; returns a kubeconfig for the agent's ServiceAccount.
pub async fn install_deploy(cluster: &Cluster) -> Result<PathBuf, Error> {
    let admin = cluster.client()?;
    liqo_core::crds::install(&admin, &[liqo_vk::shadow::shadow_pod_crd()], FIELD_MANAGER).await?;
    for file in ["namespace.yaml", "rbac.yaml", "guard.yaml"] {
        for doc in documents(file)? {
            apply_doc(&admin, file, &doc).await?;
        }
    }
    let sa = cluster.user_client(SA_USER, &SA_GROUPS).await?;
    for attrs in one_request_per_rule()? {
        wait_until_allowed(&sa, attrs).await?;
    }
    wait_for_guard(&sa).await?;
    Ok(cluster.user_kubeconfig(SA_USER, &SA_GROUPS)?)
}

/// The lines of an agent's log that report a refusal by the API server (RBAC's 403 or the
/// guard's denial).
pub fn refusals(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .map(str::to_owned)
        .collect()
}
