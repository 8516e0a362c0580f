//! Label selectors: validation and matching, as the Kubernetes API defines them.
//!
//! Owns the meaning of `matchLabels` / `matchExpressions`: every requirement must
//! hold (AND); an empty selector matches everything; `NotIn` and `DoesNotExist`
//! match objects that lack the key.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::error::FieldError;

/// A label set.
pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// `matchLabels` as `In` requirements plus `matchExpressions`, sorted.
    reqs: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.reqs.is_empty()
    }

    /// Validates a selector; `path` names it in errors (`spec.podSelector`).
    ///
    /// Fails on an unknown operator, `In`/`NotIn` without values,
    /// `Exists`/`DoesNotExist` with values, or label keys/values the API rejects.
    pub fn from_api(sel: &LabelSelector, path: &str) -> Result<Selector, FieldError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            let p = format!("{path}.matchLabels");
            validate_key(k, &p)?;
            validate_value(v, &format!("{p}[{k}]"))?;
            reqs.push(Requirement {
                key: k.clone(),
                op: Op::In,
                values: vec![v.clone()],
            });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let p = format!("{path}.matchExpressions[{i}]");
            validate_key(&e.key, &format!("{p}.key"))?;
            let values = e.values.clone().unwrap_or_default();
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(FieldError::new(
                        format!("{p}.operator"),
                        format!("unsupported operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                    ));
                }
            };
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{p}.values"),
                        "must be specified when operator is In or NotIn",
                    ));
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{p}.values"),
                        "may not be specified when operator is Exists or DoesNotExist",
                    ));
                }
                _ => {}
            }
            for (j, v) in values.iter().enumerate() {
                validate_value(v, &format!("{p}.values[{j}]"))?;
            }
            let mut values = values;
            values.sort();
            values.dedup();
            reqs.push(Requirement {
                key: e.key.clone(),
                op,
                values,
            });
        }
        reqs.sort();
        reqs.dedup();
        Ok(Selector { reqs })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match r.op {
                Op::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => v.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match r.op {
                Op::In if r.values.len() == 1 => format!("{}={}", r.key, r.values[0]),
                Op::In => format!("{} in ({})", r.key, r.values.join(",")),
                Op::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Op::Exists => r.key.clone(),
                Op::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A qualified name: `[prefix/]name`, name <= 63 chars of `[A-Za-z0-9-_.]`,
/// starting and ending alphanumeric; prefix a DNS subdomain.
fn validate_key(key: &str, path: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let bad = |why: &str| {
        Err(FieldError::new(
            path,
            format!("invalid label key {key:?}: {why}"),
        ))
    };
    if name.is_empty() || name.len() > 63 {
        return bad("name part must be 1-63 characters");
    }
    if !name.chars().all(is_name_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return bad(
            "name part must be alphanumeric, '-', '_' or '.', starting and ending alphanumeric",
        );
    }
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return bad("prefix must be a lowercase DNS subdomain");
        }
    }
    Ok(())
}

/// A label value: empty, or <= 63 chars of `[A-Za-z0-9-_.]` starting and ending
/// alphanumeric.
fn validate_value(v: &str, path: &str) -> Result<(), FieldError> {
    if v.is_empty() {
        return Ok(());
    }
    let ok = v.len() <= 63
        && v.chars().all(is_name_char)
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(path, format!("invalid label value {v:?}")))
    }
}

/// Validates a label set of an object (`metadata.labels`).
pub fn validate_labels(labels: &Labels, path: &str) -> Result<(), FieldError> {
    for (k, v) in labels {
        validate_key(k, path)?;
        validate_value(v, &format!("{path}[{k}]"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::from_api(
            &LabelSelector {
                match_expressions: Some(exprs),
                match_labels: None,
            },
            "s",
        )
        .unwrap()
    }

    #[test]
    fn operators_and_missing_keys() {
        let a = labels(&[("pod", "a")]);
        let none = labels(&[]);
        assert!(sel(vec![expr("pod", "In", &["a", "b"])]).matches(&a));
        assert!(!sel(vec![expr("pod", "In", &["b"])]).matches(&a));
        assert!(!sel(vec![expr("pod", "In", &["a"])]).matches(&none));
        assert!(sel(vec![expr("pod", "NotIn", &["b"])]).matches(&a));
        assert!(
            sel(vec![expr("pod", "NotIn", &["a"])]).matches(&none),
            "NotIn matches a missing key"
        );
        assert!(sel(vec![expr("pod", "Exists", &[])]).matches(&a));
        assert!(!sel(vec![expr("pod", "Exists", &[])]).matches(&none));
        assert!(sel(vec![expr("pod", "DoesNotExist", &[])]).matches(&none));
        assert!(Selector::everything().matches(&none));
    }

    #[test]
    fn invalid_selectors_are_rejected() {
        let bad = |e| {
            Selector::from_api(
                &LabelSelector {
                    match_expressions: Some(vec![e]),
                    match_labels: None,
                },
                "spec.podSelector",
            )
            .unwrap_err()
            .to_string()
        };
        assert!(
            bad(expr("pod", "Equals", &["a"]))
                .contains("spec.podSelector.matchExpressions[0].operator")
        );
        assert!(bad(expr("pod", "In", &[])).contains("must be specified"));
        assert!(bad(expr("pod", "Exists", &["x"])).contains("may not be specified"));
        assert!(bad(expr("-pod", "Exists", &[])).contains("invalid label key"));
    }
}
