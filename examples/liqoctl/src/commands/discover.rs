//! `discover`: the clusters discovery found, one ForeignCluster each.

use kube::{Api, ResourceExt, api::ListParams};
use liqo_core::crds::{ForeignCluster, foreign_cluster_condition as cond};
use serde::Serialize;

use super::{CondView, ago, fc_conditions};
use crate::{CliError, cli::Cli, kube_util::Target, output};

/// One discovered cluster.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Discovered {
    cluster_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_name: Option<String>,
    source: String,
    sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peering_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key_fingerprint: Option<String>,
    role: String,
    established_role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    discovered: Option<CondView>,
    key_mismatch: bool,
}

fn to_value<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "-".into(),
    }
}

fn short_fingerprint(fp: &str) -> String {
    match fp.strip_prefix("sha256:") {
        Some(hex) if hex.len() > 12 => format!("sha256:{}…", &hex[..12]),
        _ => fp.to_owned(),
    }
}

/// Lists every ForeignCluster, sorted by cluster id.
pub(crate) async fn list(local: &Target) -> Result<Vec<ForeignCluster>, CliError> {
    let mut fcs = Api::<ForeignCluster>::all(local.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(local.err("listing ForeignClusters"))?
        .items;
    fcs.sort_by_key(|a| a.name_any());
    Ok(fcs)
}

/// `discover`.
pub async fn discover(cli: &Cli, local: &Target) -> Result<(), CliError> {
    let fcs = list(local).await?;
    let rows: Vec<(Discovered, String)> = fcs
        .iter()
        .map(|fc| {
            let status = fc.status.clone().unwrap_or_default();
            let conds = fc_conditions(fc);
            (
                Discovered {
                    cluster_id: fc.spec.cluster_id.to_string(),
                    cluster_name: fc.spec.cluster_name.clone(),
                    source: to_value(&fc.spec.discovery.source),
                    sources: status.discovery_sources.iter().map(to_value).collect(),
                    peering_endpoint: fc.spec.peering_endpoint.clone(),
                    public_key_fingerprint: fc.spec.public_key_fingerprint.map(|f| f.to_string()),
                    role: to_value(&fc.spec.role),
                    established_role: to_value(&status.role),
                    last_seen: status.last_seen.as_ref().map(|t| t.0.to_string()),
                    discovered: CondView::of(conds, cond::DISCOVERED),
                    key_mismatch: CondView::of(conds, cond::KEY_MISMATCH)
                        .is_some_and(|c| c.is_true()),
                },
                status
                    .last_seen
                    .as_ref()
                    .map(ago)
                    .unwrap_or_else(|| "-".into()),
            )
        })
        .collect();
    let data: Vec<&Discovered> = rows.iter().map(|(d, _)| d).collect();
    output::emit(cli.output, &data, || {
        if rows.is_empty() {
            return "no clusters discovered (no ForeignCluster); peer by hand with `liqoctl peer --provider-kubeconfig PATH`\n".into();
        }
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|(d, seen)| {
                vec![
                    d.cluster_id.clone(),
                    output::or_dash(d.cluster_name.as_ref()),
                    d.source.clone(),
                    output::or_dash(d.peering_endpoint.as_ref()),
                    output::or_dash(d.public_key_fingerprint.as_deref().map(short_fingerprint)),
                    if d.key_mismatch {
                        format!("{} (KEY MISMATCH)", d.role)
                    } else {
                        d.role.clone()
                    },
                    seen.clone(),
                ]
            })
            .collect();
        output::table(
            &[
                "CLUSTER ID",
                "NAME",
                "SOURCE",
                "ENDPOINT",
                "FINGERPRINT",
                "ROLE",
                "LAST SEEN",
            ],
            &table,
        )
    })
}
