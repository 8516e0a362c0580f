//! Strict reading: the first field of an object that its API type does not
//! have (kubectl's strict field validation), so a misspelled field rejects
//! the object instead of being dropped.

use serde_json::Value;

/// The path of the first field of `given` that `known` (the same object read
/// into its API type and written back) does not have.
pub(crate) fn unknown_field(given: &Value, known: &Value, at: String) -> Option<String> {
    let join = |key: &str| {
        if at.is_empty() {
            key.to_string()
        } else {
            format!("{at}.{key}")
        }
    };
    match (given, known) {
        (Value::Object(g), Value::Object(k)) => g.iter().find_map(|(key, gv)| {
            if gv.is_null() {
                return None;
            }
            match k.get(key) {
                None => Some(join(key)),
                Some(kv) => unknown_field(gv, kv, join(key)),
            }
        }),
        (Value::Array(g), Value::Array(k)) => g
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (gv, kv))| unknown_field(gv, kv, format!("{at}[{i}]"))),
        _ => None,
    }
}
