use std::path::PathBuf;

/// Why a configuration was refused. Each variant names what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}; check the path given to --config")]
    Read { path: PathBuf, message: String },
    #[error("config file{} is not valid: {message}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Toml {
        path: Option<PathBuf>,
        message: String,
    },
    #[error("environment variable {var}={value:?} is not valid: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("configuration field {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// A value that does not fit its field: what was expected and what came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(pub String);
