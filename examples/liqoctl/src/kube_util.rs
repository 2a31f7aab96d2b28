//! Connecting to a cluster, turning Kubernetes errors into what-to-do messages, and watching one
//! object until a check passes.

use std::{fmt::Debug, path::Path, time::Duration};

use futures::{StreamExt, pin_mut};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;

use crate::{CliError, progress::Reporter};

/// A connected cluster and how to name it in messages.
#[derive(Clone)]
pub struct Target {
    /// The client.
    pub client: Client,
    /// The API server URL.
    pub url: String,
    /// `local cluster` or `provider cluster`, for messages.
    pub who: &'static str,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("who", &self.who)
            .finish()
    }
}

impl Target {
    /// Maps an API error of `action` on this cluster.
    pub fn err(&self, action: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> CliError {
        let (who, url, action) = (self.who, self.url.clone(), action.to_string());
        move |e| api_error(who, &url, &action, e)
    }
}

/// Connects to a cluster through a kubeconfig (or the default one) and a context.
pub async fn connect(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    who: &'static str,
) -> Result<Target, CliError> {
    let config = load_config(kubeconfig, context, who).await?;
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| {
        CliError::failed(
            format!("cannot build a client for the {who} at {url}: {e}"),
            "check the kubeconfig's certificate data",
        )
    })?;
    Ok(Target { client, url, who })
}

/// The client configuration of a kubeconfig (or the default one) and a context.
pub async fn load_config(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
    who: &'static str,
) -> Result<Config, CliError> {
    let opts = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let which = match (kubeconfig, context) {
        (Some(p), Some(c)) => format!("kubeconfig {} (context {c})", p.display()),
        (Some(p), None) => format!("kubeconfig {}", p.display()),
        (None, Some(c)) => format!("the default kubeconfig (context {c})"),
        (None, None) => "the default kubeconfig".to_owned(),
    };
    let bad = |e: &dyn std::fmt::Display| {
        CliError::failed(
            format!("cannot load the {who}'s {which}: {e}"),
            "check the path and the context name (`kubectl config get-contexts`)",
        )
    };
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| bad(&e))?
        }
        None if context.is_some() => Config::from_kubeconfig(&opts).await.map_err(|e| bad(&e))?,
        None => Config::infer().await.map_err(|e| bad(&e))?,
    };
    config.connect_timeout = Some(Duration::from_secs(10));
    Ok(config)
}

/// Whether an error is a 404 for an object (not for a missing resource type).
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 && !missing_type(s))
}

fn missing_type(s: &kube::core::Status) -> bool {
    s.message.contains("could not find the requested resource")
}

/// Turns a Kubernetes error into what failed and what to do next.
pub fn api_error(who: &str, url: &str, action: &str, e: kube::Error) -> CliError {
    match &e {
        kube::Error::Api(s) if s.code == 401 => CliError::failed(
            format!("{action}: the {who} at {url} rejected the credential (401 Unauthorized)"),
            "the kubeconfig's credential is expired or wrong: refresh it or choose another --context",
        ),
        kube::Error::Api(s) if s.code == 403 => CliError::failed(
            format!("{action}: forbidden on the {who}: {}", s.message),
            "use a kubeconfig whose user may manage liqo.io resources (cluster admin), or ask for that RBAC",
        ),
        kube::Error::Api(s) if s.code == 404 && missing_type(s) => CliError::failed(
            format!("{action}: the {who} at {url} does not serve the liqo.io resources"),
            "install the CRDs (`kubectl apply -f deploy/crds/`) and the liqo agent on that cluster",
        ),
        kube::Error::Api(s) => CliError::failed(
            format!(
                "{action}: the {who} answered {} {}: {}",
                s.code, s.reason, s.message
            ),
            "fix what the API server reports above and retry",
        ),
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::RustlsTls(_)
        | kube::Error::Auth(_) => CliError::failed(
            format!("{action}: cannot reach the {who}'s API server at {url}: {e}"),
            "check that the cluster is up and that --kubeconfig/--context point at it",
        ),
        _ => CliError::plain(format!("{action} on the {who}: {e}")),
    }
}

/// Watches the object `name` of `api` until `check` returns `Some`, reporting progress to `rep`.
/// Transient watch errors are retried with backoff (the caller bounds the time); authorization
/// errors and missing resource types end the wait at once.
pub async fn watch_until<K, T>(
    target: &Target,
    api: Api<K>,
    name: &str,
    rep: &Reporter,
    check: impl FnMut(Option<&K>, &Reporter) -> Option<T>,
) -> Result<T, CliError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    watch_until_kind(target, api, &kind, name, rep, check).await
}

/// [`watch_until`] for objects without a static kind (`DynamicObject`).
pub async fn watch_until_kind<K, T>(
    target: &Target,
    api: Api<K>,
    kind: &str,
    name: &str,
    rep: &Reporter,
    mut check: impl FnMut(Option<&K>, &Reporter) -> Option<T>,
) -> Result<T, CliError>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher::watch_object(api, name).backoff(liqo_core::watch_backoff());
    pin_mut!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(obj) => {
                if let Some(done) = check(obj.as_ref(), rep) {
                    return Ok(done);
                }
            }
            Err(
                watcher::Error::InitialListFailed(e)
                | watcher::Error::WatchStartFailed(e)
                | watcher::Error::WatchFailed(e),
            ) if matches!(&e, kube::Error::Api(s) if matches!(s.code, 401 | 403 | 404)) => {
                return Err(api_error(
                    target.who,
                    &target.url,
                    &format!("watching {kind} {name}"),
                    e,
                ));
            }
            Err(e) => rep.note(format!(
                "watch of {kind} {name} interrupted ({e}); retrying"
            )),
        }
    }
    Err(CliError::plain(format!("the watch of {kind} {name} ended")))
}
