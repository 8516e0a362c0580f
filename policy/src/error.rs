//! The policy crate's errors.

use std::path::PathBuf;

/// A field of an object that fails validation, with its path
/// (`spec.ingress[0].from[1].ipBlock.except[0]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Everything that can go wrong turning cluster objects into flows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object the API server would reject; nothing of it was applied.
    #[error("invalid {kind} {object}")]
    Invalid {
        kind: &'static str,
        object: String,
        #[source]
        source: FieldError,
    },
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: malformed YAML", path.display())]
    Yaml {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A document that is not an object we can load.
    #[error("{}: document {index}: {message}", path.display())]
    Document {
        path: PathBuf,
        index: usize,
        message: String,
    },
    /// An object inside a manifest file failed.
    #[error("{}: document {index}", path.display())]
    InFile {
        path: PathBuf,
        index: usize,
        #[source]
        source: Box<Error>,
    },
    #[error("failed to install flows")]
    Flows(#[source] datapath::FlowError),
}
