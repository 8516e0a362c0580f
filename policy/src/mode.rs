//! The `vswitch.io/mode` annotation: whether a policy is enforced or staged.
//!
//! Owns reading it, strictly, for NetworkPolicies and ClusterNetworkPolicies
//! alike; what a staged policy then does is [`crate::staging`]'s.

use std::collections::BTreeMap;

use crate::error::FieldError;

/// The annotation that stages a policy.
pub const MODE_ANNOTATION: &str = "vswitch.io/mode";

/// Reads a policy's mode from its annotations: `Ok(true)` when staged
/// (`audit`), `Ok(false)` when enforced (`enforce`, or no annotation).
///
/// Fails on any other value, naming the annotation: a policy whose mode is
/// mistyped is rejected rather than guessed at.
pub fn staged(annotations: Option<&BTreeMap<String, String>>) -> Result<bool, FieldError> {
    match annotations
        .and_then(|a| a.get(MODE_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("enforce") => Ok(false),
        Some("audit") => Ok(true),
        Some(other) => Err(FieldError::new(
            format!("metadata.annotations[{MODE_ANNOTATION}]"),
            format!("unsupported value {other:?} (audit, enforce)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_annotation_reads_strictly() {
        let a = |v: &str| BTreeMap::from([(MODE_ANNOTATION.to_string(), v.to_string())]);
        assert_eq!(staged(None), Ok(false));
        assert_eq!(staged(Some(&a("enforce"))), Ok(false));
        assert_eq!(staged(Some(&a("audit"))), Ok(true));
        let e = staged(Some(&a("Audit"))).unwrap_err();
        assert_eq!(e.path, "metadata.annotations[vswitch.io/mode]");
        assert!(e.message.contains("\"Audit\""), "{e}");
    }
}
