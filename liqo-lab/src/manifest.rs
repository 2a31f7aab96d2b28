//! Applying YAML manifests the way `kubectl apply --server-side -f` does, and waiting until
//! the RBAC they grant takes effect, for the tests and demos that install `deploy/` into lab
//! clusters.

use std::{path::Path, time::Duration};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};

use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    discovery::Scope,
};

use crate::{LabError, Result};

fn bad(what: impl Into<String>, message: impl std::fmt::Display) -> LabError {
    LabError::Manifest {
        what: what.into(),
        message: message.to_string(),
    }
}

/// The documents of a YAML file, as JSON values; empty and comment-only documents are skipped.
/// Errors name the file and the document's index.
pub fn read_manifest(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| LabError::Io {
        action: "reading",
        path: path.to_owned(),
        source,
    })?;
    let mut out = vec![];
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
        let what = || format!("{}, document {i}", path.display());
        let v = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc)
            .map_err(|e| bad(what(), e))?;
        if v.is_null() {
            continue;
        }
        out.push(serde_json::to_value(&v).map_err(|e| bad(what(), e))?);
    }
    Ok(out)
}

/// Server-side applies one document of any kind (found by discovery) as `field_manager`,
/// forcing conflicts; with `dry_run` the server validates and admits it without storing it.
/// Returns `"<Kind> <name>"`.
pub async fn apply_document(
    client: &Client,
    doc: &serde_json::Value,
    field_manager: &str,
    dry_run: bool,
) -> Result<String> {
    let obj: DynamicObject =
        serde_json::from_value(doc.clone()).map_err(|e| bad("a document", e))?;
    let types = obj
        .types
        .clone()
        .ok_or_else(|| bad("a document", "no apiVersion/kind"))?;
    let (group, version) = match types.api_version.split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), types.api_version.clone()),
    };
    let name = obj.name_any();
    let what = format!("{} {name}", types.kind);
    let gvk = GroupVersionKind::gvk(&group, &version, &types.kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(|e| bad(&what, e))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            obj.metadata
                .namespace
                .as_deref()
                .ok_or_else(|| bad(&what, "namespaced, but names no namespace"))?,
            &ar,
        ),
    };
    let mut pp = PatchParams::apply(field_manager).force();
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(&name, &pp, &Patch::Apply(doc))
        .await
        .map_err(|e| bad(&what, format!("applying: {e}")))?;
    Ok(what)
}

/// Waits until the authorizer lets `client`'s user do `attrs` (it learns of new roles and
/// bindings through an informer, and nothing about that can be watched from outside: hence a
/// short retry), for at most `within`.
pub async fn wait_until_allowed(
    client: &Client,
    attrs: &ResourceAttributes,
    within: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(attrs.clone()),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    loop {
        let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| bad(format!("access review of {attrs:?}"), e))?;
        if answer.status.is_some_and(|s| s.allowed) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(bad(
                format!("{attrs:?}"),
                format!("still not allowed after {within:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates `obj` in `namespace` as `client`'s user, as a dry run, until the API server refuses
/// it (an admission policy takes effect a moment after it is applied), for at most `within`;
/// returns the refusal. Succeeding until then, or failing other than by a refusal, is an error.
pub async fn wait_until_refused<K>(
    client: &Client,
    namespace: &str,
    obj: &K,
    within: Duration,
) -> Result<kube::core::Status>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    wait_until_refused_by(
        &Api::<K>::namespaced(client.clone(), namespace),
        obj,
        within,
    )
    .await
}

/// [`wait_until_refused`] through any `api` (cluster-scoped kinds too).
pub async fn wait_until_refused_by<K>(
    api: &Api<K>,
    obj: &K,
    within: Duration,
) -> Result<kube::core::Status>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let what = format!(
        "{} {}",
        K::kind(&K::DynamicType::default()),
        obj.meta().name.as_deref().unwrap_or_default()
    );
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match api.create(&dry, obj).await {
            Err(kube::Error::Api(refusal)) => return Ok(*refusal),
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(_) => return Err(bad(what, format!("still accepted after {within:?}"))),
            Err(e) => return Err(bad(what, format!("creating (dry run): {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_documents_and_names_the_bad_one() {
        let dir = std::env::temp_dir().join(format!("liqo-lab-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(
            &good,
            "# a comment only\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
        )
        .unwrap();
        let docs = read_manifest(&good).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["metadata"]["name"], "b");
        let broken = dir.join("broken.yaml");
        std::fs::write(&broken, "kind: A\n---\nkind: [unclosed\n").unwrap();
        let e = read_manifest(&broken).unwrap_err().to_string();
        assert!(e.contains("broken.yaml, document 1"), "{e}");
        let e = read_manifest(&dir.join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
