//! `offload namespace` and `unoffload namespace`.

use k8s_openapi::api::core::v1::{
    Namespace, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
};
use kube::{
    Api, Resource,
    api::{DeleteParams, Patch, PatchParams},
};
use liqo_core::crds::{
    NamespaceMappingStrategy, NamespaceOffloading, NamespaceOffloadingSpec, OffloadingPhase,
    PodOffloadingStrategy, RemoteNamespaceStatusEntry,
};
use serde_json::json;

use super::CondView;
use crate::{
    CliError, FIELD_MANAGER,
    cli::{Cli, MappingStrategy, OffloadNamespaceArgs, Selector},
    kube_util::{Target, is_not_found, watch_until},
    output,
    progress::Steps,
};

/// The one NamespaceOffloading of a namespace.
const NAME: &str = "offloading";

/// The cluster selector for `key=value` pairs: one term, all pairs must match.
pub(crate) fn node_selector(sel: &Selector) -> NodeSelector {
    NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_expressions: Some(
                sel.0
                    .iter()
                    .map(|(k, v)| NodeSelectorRequirement {
                        key: k.clone(),
                        operator: "In".into(),
                        values: Some(vec![v.clone()]),
                    })
                    .collect(),
            ),
            match_fields: None,
        }],
    }
}

/// The spec `offload namespace` applies.
pub(crate) fn spec_of(args: &OffloadNamespaceArgs) -> Result<NamespaceOffloadingSpec, CliError> {
    match (args.namespace_mapping_strategy, &args.remote_namespace_name) {
        (MappingStrategy::SelectedName, None) => {
            return Err(CliError::Usage(
                "--namespace-mapping-strategy SelectedName needs --remote-namespace-name NAME"
                    .into(),
            ));
        }
        (MappingStrategy::DefaultName | MappingStrategy::EnforceSameName, Some(_)) => {
            return Err(CliError::Usage(
                "--remote-namespace-name is only allowed with --namespace-mapping-strategy SelectedName"
                    .into(),
            ));
        }
        _ => {}
    }
    Ok(NamespaceOffloadingSpec {
        namespace_mapping_strategy: NamespaceMappingStrategy::from(args.namespace_mapping_strategy),
        remote_namespace_name: args.remote_namespace_name.clone(),
        pod_offloading_strategy: PodOffloadingStrategy::from(args.pod_offloading_strategy),
        cluster_selector: args.selector.as_ref().map(node_selector),
    })
}

fn entries_table(entries: &[RemoteNamespaceStatusEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.cluster_id.to_string(),
                e.namespace.clone(),
                if e.ready { "True" } else { "False" }.into(),
                output::or_dash(Some(&e.message)),
            ]
        })
        .collect();
    output::table(&["CLUSTER", "REMOTE NAMESPACE", "READY", "MESSAGE"], &rows)
}

/// `offload namespace`.
pub async fn offload(
    cli: &Cli,
    local: &Target,
    args: &OffloadNamespaceArgs,
) -> Result<(), CliError> {
    let spec = spec_of(args)?;
    let ns = &args.name;
    Api::<Namespace>::all(local.client.clone())
        .get_opt(ns)
        .await
        .map_err(local.err(format!("reading namespace {ns}")))?
        .ok_or_else(|| {
            CliError::failed(
                format!("namespace {ns} does not exist on the local cluster"),
                format!("create it first (`kubectl create namespace {ns}`) or check the name"),
            )
        })?;
    let body = json!({
        "apiVersion": NamespaceOffloading::api_version(&()),
        "kind": NamespaceOffloading::kind(&()),
        "metadata": {"name": NAME, "namespace": ns},
        "spec": spec,
    });
    let api: Api<NamespaceOffloading> = Api::namespaced(local.client.clone(), ns);
    let applied = api
        .patch(
            NAME,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 422 => CliError::failed(
                format!(
                    "the local cluster rejected NamespaceOffloading {ns}/{NAME}: {}",
                    s.message
                ),
                "fix the flag the message names",
            ),
            _ => local.err(format!("applying NamespaceOffloading {ns}/{NAME}"))(e),
        })?;
    let clusters = match &args.selector {
        Some(s) => {
            s.0.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        }
        None => "all".into(),
    };
    eprintln!(
        "NamespaceOffloading {ns}/{NAME} applied: pods {:?}, names {:?}, clusters {clusters}",
        spec.pod_offloading_strategy, spec.namespace_mapping_strategy
    );
    if !cli.wait {
        eprintln!(
            "not waiting (--wait=false); follow with `kubectl -n {ns} get namespaceoffloading {NAME}`"
        );
        return Ok(());
    }
    let generation = applied.metadata.generation;
    let steps = Steps::new(cli.timeout);
    let entries = steps
        .run(
            &format!("namespace {ns} offloaded"),
            &format!(
                "is the liqo agent running on this cluster, and is a provider peered (`liqoctl info`)? See `kubectl -n {ns} get namespaceoffloading {NAME} -o yaml`"
            ),
            |rep| async move {
                watch_until(local, api, NAME, &rep, |o, rep| {
                    let Some(o) = o else {
                        return Some(Err(CliError::failed(
                            format!("NamespaceOffloading {ns}/{NAME} was deleted while waiting"),
                            "offload the namespace again",
                        )));
                    };
                    let status = o.status.clone().unwrap_or_default();
                    let ready = CondView::of(&status.conditions, "Ready");
                    let current = status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .is_some_and(|c| c.observed_generation >= generation);
                    if !current {
                        rep.note("the agent has not reported on this version yet");
                        return None;
                    }
                    match status.phase {
                        Some(OffloadingPhase::Ready) => Some(Ok(status.remote_namespaces)),
                        Some(OffloadingPhase::NoClusterSelected) => Some(Err(CliError::failed(
                            format!("no provider matches the cluster selector of {ns} ({clusters})"),
                            "peer a provider first (`liqoctl peer`), or change --selector to labels of a virtual node (`kubectl get nodes -l liqo.io/type=virtual-node --show-labels`)",
                        ))),
                        Some(OffloadingPhase::AllFailed | OffloadingPhase::SomeFailed) => {
                            Some(Err(CliError::failed(
                                format!(
                                    "offloading {ns} failed on some providers: {}",
                                    ready.map(|r| r.short()).unwrap_or_default()
                                ),
                                "a name conflict means the twin namespace belongs to someone else there: use --namespace-mapping-strategy DefaultName or another --remote-namespace-name",
                            )))
                        }
                        phase => {
                            rep.note(format!(
                                "phase {}; {}",
                                phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into()),
                                ready.map(|r| r.short()).unwrap_or_default()
                            ));
                            None
                        }
                    }
                })
                .await?
            },
        )
        .await?;
    print!("{}", entries_table(&entries));
    Ok(())
}

/// `unoffload namespace`.
pub async fn unoffload(cli: &Cli, local: &Target, ns: &str) -> Result<(), CliError> {
    let api: Api<NamespaceOffloading> = Api::namespaced(local.client.clone(), ns);
    match api.delete(NAME, &DeleteParams::background()).await {
        Ok(_) => eprintln!("NamespaceOffloading {ns}/{NAME} deleted"),
        Err(e) if is_not_found(&e) => {
            eprintln!(
                "namespace {ns} is not offloaded (no NamespaceOffloading {NAME}); nothing to do"
            );
            return Ok(());
        }
        Err(e) => {
            return Err(local
                .err(format!("deleting NamespaceOffloading {ns}/{NAME}"))(
                e
            ));
        }
    }
    if !cli.wait {
        eprintln!("not waiting (--wait=false)");
        return Ok(());
    }
    Steps::new(cli.timeout)
        .run(
            &format!("remote namespaces of {ns} removed"),
            &format!(
                "the agent removes the twin namespaces before it lets the NamespaceOffloading go: check its logs and whether the providers are reachable (`liqoctl diagnose`); `kubectl -n {ns} get namespaceoffloading {NAME} -o yaml` shows what is left"
            ),
            |rep| async move {
                watch_until(local, api, NAME, &rep, |o, rep| match o {
                    None => Some(()),
                    Some(o) => {
                        let left: Vec<String> = o
                            .status
                            .iter()
                            .flat_map(|s| &s.remote_namespaces)
                            .map(|e| format!("{}/{}", e.cluster_id, e.namespace))
                            .collect();
                        rep.note(if left.is_empty() {
                            "waiting for the agent's finalizer".to_owned()
                        } else {
                            format!("still there: {}", left.join(", "))
                        });
                        None
                    }
                })
                .await
            },
        )
        .await?;
    eprintln!("namespace {ns} is no longer offloaded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::PodStrategy;

    fn args(mapping: MappingStrategy, name: Option<&str>) -> OffloadNamespaceArgs {
        OffloadNamespaceArgs {
            name: "demo".into(),
            pod_offloading_strategy: PodStrategy::Remote,
            namespace_mapping_strategy: mapping,
            remote_namespace_name: name.map(Into::into),
            selector: Some(Selector(vec![("region".into(), "eu".into())])),
        }
    }

    #[test]
    fn spec_follows_the_flags() {
        let s = spec_of(&args(MappingStrategy::SelectedName, Some("there"))).unwrap();
        assert_eq!(s.pod_offloading_strategy, PodOffloadingStrategy::Remote);
        assert_eq!(
            s.namespace_mapping_strategy,
            NamespaceMappingStrategy::SelectedName
        );
        assert_eq!(s.remote_namespace_name.as_deref(), Some("there"));
        let term = &s.cluster_selector.unwrap().node_selector_terms[0];
        let req = &term.match_expressions.as_ref().unwrap()[0];
        assert_eq!((req.key.as_str(), req.operator.as_str()), ("region", "In"));
        assert_eq!(req.values.as_deref(), Some(&["eu".to_owned()][..]));
    }

    #[test]
    fn remote_name_goes_with_selected_name_only() {
        let e = spec_of(&args(MappingStrategy::SelectedName, None)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = spec_of(&args(MappingStrategy::DefaultName, Some("x"))).unwrap_err();
        assert!(e.to_string().contains("only allowed"), "{e}");
    }
}
