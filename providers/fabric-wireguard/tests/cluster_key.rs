//! The gateway's key in a real cluster: made once, the same at every later start, and a Secret
//! that does not hold a key is an error naming it (never replaced, which would break peers).

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use liqo_fabric_wireguard::cluster::{KEY_FIELD, KEY_SECRET, NAMESPACE, cluster_key};
use liqo_lab::{ClusterSpec, LabSpec};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn the_key_is_made_once_and_kept() -> TestResult {
    let lab = liqo_lab::shared(|| LabSpec::new([ClusterSpec::new("wgkey")])).await?;
    let client = lab.cluster("wgkey").ok_or("no cluster")?.client()?;
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let _ = secrets.delete(KEY_SECRET, &DeleteParams::default()).await;

    let first = cluster_key(&client).await?;
    let again = cluster_key(&client).await?;
    assert_eq!(
        first.to_base64(),
        again.to_base64(),
        "the stored key is reused"
    );
    let stored = secrets.get(KEY_SECRET).await?;
    let field = stored
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_FIELD))
        .ok_or("the Secret holds the key")?;
    assert_eq!(String::from_utf8_lossy(&field.0), first.to_base64());

    // A Secret without the key (hand-made, or damaged) is reported, not overwritten.
    secrets.delete(KEY_SECRET, &DeleteParams::default()).await?;
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some(KEY_SECRET.into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    "other".to_owned(),
                    ByteString(b"x".to_vec()),
                )])),
                ..Secret::default()
            },
        )
        .await?;
    let err = cluster_key(&client)
        .await
        .expect_err("no key in the Secret");
    assert!(
        err.to_string().contains(KEY_SECRET) && err.to_string().contains(KEY_FIELD),
        "{err}"
    );
    assert!(
        secrets
            .get(KEY_SECRET)
            .await?
            .data
            .is_some_and(|d| !d.contains_key(KEY_FIELD)),
        "the Secret is left as it was"
    );
    Ok(())
}
