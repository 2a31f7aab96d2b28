//! Matching a `NodeSelector` (the `clusterSelector` of a `NamespaceOffloading`) against labels.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement};

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&String>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let num = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(|v| num(v)), values.first().and_then(|v| num(v))), (Some(a), Some(b)) if a > b)
        }
        "Lt" => {
            matches!((value.and_then(|v| num(v)), values.first().and_then(|v| num(v))), (Some(a), Some(b)) if a < b)
        }
        _ => false,
    }
}

/// Whether a node named `name` with `labels` matches `selector`, with the Kubernetes semantics:
/// terms are ORed, requirements within a term ANDed; an empty term matches nothing. `None`
/// selects every node.
pub fn matches(
    selector: Option<&NodeSelector>,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    if selector.node_selector_terms.is_empty() {
        return true;
    }
    selector.node_selector_terms.iter().any(|term| {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        if exprs.is_empty() && fields.is_empty() {
            return false;
        }
        let name = name.to_owned();
        exprs
            .iter()
            .all(|r| requirement_matches(r, labels.get(&r.key)))
            && fields
                .iter()
                .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(&name)))
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeSelectorTerm;

    use super::*;

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| (*v).into()).collect()),
        }
    }

    #[test]
    fn terms_or_requirements_and() {
        let labels = BTreeMap::from([
            ("region".to_owned(), "eu".to_owned()),
            ("gpus".to_owned(), "4".to_owned()),
        ]);
        let sel = |terms: Vec<Vec<NodeSelectorRequirement>>| NodeSelector {
            node_selector_terms: terms
                .into_iter()
                .map(|e| NodeSelectorTerm {
                    match_expressions: Some(e),
                    match_fields: None,
                })
                .collect(),
        };
        assert!(matches(None, "n", &labels));
        assert!(matches(
            Some(&sel(vec![vec![req("region", "In", &["eu", "us"])]])),
            "n",
            &labels
        ));
        assert!(!matches(
            Some(&sel(vec![vec![req("region", "In", &["us"])]])),
            "n",
            &labels
        ));
        assert!(matches(
            Some(&sel(vec![
                vec![req("region", "In", &["us"])],
                vec![req("gpus", "Gt", &["2"])]
            ])),
            "n",
            &labels
        ));
        assert!(!matches(
            Some(&sel(vec![vec![
                req("region", "In", &["eu"]),
                req("zone", "Exists", &[])
            ]])),
            "n",
            &labels
        ));
        assert!(matches(
            Some(&sel(vec![vec![
                req("zone", "DoesNotExist", &[]),
                req("region", "NotIn", &["us"])
            ]])),
            "n",
            &labels
        ));
        let by_name = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![req("metadata.name", "In", &["liqo-rome"])]),
            }],
        };
        assert!(matches(Some(&by_name), "liqo-rome", &labels));
        assert!(!matches(Some(&by_name), "liqo-milan", &labels));
    }
}
