//! JWT authentication: HS256 tokens whose `sub` is the user and whose `scope` lists what
//! the bearer may do (`device`, `publish`, `admin`; space- or comma-separated).
//!
//! Keys: the secret of `jwt_secret_file` (signs what `warbler token` mints, verifies tokens
//! without a `kid`), and the files of `auth.keys_dir`, each verifying tokens whose header
//! names its file as `kid`. The directory is re-read by [`Auth::reload`], so keys rotate
//! without a restart: add the new key, mint with it, remove the old one once its tokens
//! have expired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use warbler_config::AuthConfig;

/// Shortest accepted HS256 secret, in bytes: shorter ones are guessable.
pub const SECRET_BYTES_MIN: usize = 16;
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;
/// Most keys one `auth.keys_dir` may hold (a token without `kid` is tried with each).
const KEYS_MAX: usize = 64;

pub use warbler_client::auth::{Claims, Scope};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("no token: send `Authorization: Bearer <token>` (mint one with `warbler token`)")]
    Missing,
    #[error("the token has expired; mint a new one")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token's scope {have:?} does not allow {need}; use a token with scope {need}")]
    Forbidden { have: String, need: &'static str },
}

/// Why a JWT secret cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("the JWT secret {0} is {1} bytes; use at least {SECRET_BYTES_MIN} random bytes (e.g. `openssl rand -hex 32`)")]
    TooShort(String, usize),
    #[error("cannot read the JWT secret file {path}: {message}; pass --jwt-secret-file with a readable file")]
    Unreadable { path: String, message: String },
    #[error("cannot read auth.keys_dir {path}: {message}; point --jwt-keys-dir at a directory of key files")]
    KeysDir { path: String, message: String },
    #[error("auth.keys_dir {0} holds more than {KEYS_MAX} keys; remove the retired ones")]
    TooManyKeys(String),
    #[error("no JWT secret: pass --jwt-secret-file FILE or --jwt-keys-dir DIR (or set jwt_secret_file / auth.keys_dir)")]
    None,
}

/// Mints and verifies tokens.
pub struct Auth {
    /// `jwt_secret_file`'s secret: mints, and verifies tokens without a `kid`.
    secret: Option<Vec<u8>>,
    default_key: Option<DecodingKey>,
    keys_dir: Option<PathBuf>,
    /// `auth.keys_dir` as last read: key id → (secret, its decoding key).
    keys: RwLock<BTreeMap<String, (Vec<u8>, DecodingKey)>>,
    validation: Validation,
    max_lifetime_secs: u64,
}

impl Auth {
    /// One secret, no other checks (the CLI's minting, and tests).
    pub fn new(secret: &[u8]) -> Result<Auth, SecretError> {
        Auth::build(Some(secret.to_vec()), &AuthConfig::default())
    }

    /// Reads the secret from a file (surrounding whitespace is not part of it).
    pub fn from_file(path: &Path) -> Result<Auth, SecretError> {
        Auth::new(&read_secret_file(path)?)
    }

    /// The node's verifier: `jwt_secret_file` and `auth`. At least one key is needed.
    pub fn from_config(secret_file: Option<&Path>, auth: &AuthConfig) -> Result<Auth, SecretError> {
        let secret = secret_file.map(read_secret_file).transpose()?;
        let this = Auth::build(secret, auth)?;
        this.reload()?;
        if this.secret.is_none() && this.keys.read().unwrap().is_empty() {
            return Err(SecretError::None);
        }
        Ok(this)
    }

    fn build(secret: Option<Vec<u8>>, config: &AuthConfig) -> Result<Auth, SecretError> {
        if let Some(s) = &secret {
            check_length("file", s)?;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Auth {
            default_key: secret.as_deref().map(DecodingKey::from_secret),
            secret,
            keys_dir: config.keys_dir.clone(),
            keys: RwLock::new(BTreeMap::new()),
            validation,
            max_lifetime_secs: config.max_lifetime_secs,
        })
    }

    /// Re-reads `auth.keys_dir`; `Ok(true)` when the set of keys changed. On an error the
    /// keys in use stay as they were.
    pub fn reload(&self) -> Result<bool, SecretError> {
        let Some(dir) = &self.keys_dir else {
            return Ok(false);
        };
        let read = read_keys_dir(dir)?;
        let unchanged = {
            let keys = self.keys.read().unwrap();
            keys.len() == read.len()
                && keys
                    .iter()
                    .zip(&read)
                    .all(|((k, (s, _)), (k2, s2))| k == k2 && s == s2)
        };
        if unchanged {
            return Ok(false);
        }
        let kids: Vec<&String> = read.keys().collect();
        tracing::info!(dir = %dir.display(), ?kids, "JWT verification keys loaded");
        let keys = read
            .into_iter()
            .map(|(kid, s)| {
                let key = DecodingKey::from_secret(&s);
                (kid, (s, key))
            })
            .collect();
        *self.keys.write().unwrap() = keys;
        Ok(true)
    }

    /// Re-reads `auth.keys_dir` every `period` until `stop`.
    pub async fn keep_keys_fresh(
        self: std::sync::Arc<Self>,
        period: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.keys_dir.is_none() {
            return;
        }
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            match self.reload() {
                Ok(_) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot re-read the JWT keys; the keys loaded before stay in use");
                }
                Err(_) => {}
            }
        }
    }

    pub fn mint(&self, claims: &Claims) -> String {
        self.mint_with_kid(claims, None)
    }

    /// Mints with the secret, naming `kid` as its key id (for a node whose `auth.keys_dir`
    /// holds this secret under that name).
    pub fn mint_with_kid(&self, claims: &Claims, kid: Option<&str>) -> String {
        let secret = self
            .secret
            .as_deref()
            .expect("minting needs jwt_secret_file");
        warbler_client::auth::mint_with_kid(secret, claims, kid)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| decode_error(&e))?;
        let keys = self.keys.read().unwrap();
        let claims = match &header.kid {
            Some(kid) => match keys.get(kid) {
                Some((_, key)) => self.decode(token, key),
                None if keys.is_empty() && self.default_key.is_some() => {
                    // No key directory: the one secret verifies every token.
                    self.decode(token, self.default_key.as_ref().expect("checked"))
                }
                None => Err(AuthError::Invalid(format!(
                    "no key with id {kid:?} (kid) on this node: it was removed from auth.keys_dir or not added yet"
                ))),
            },
            None => {
                let mut tried = self
                    .default_key
                    .iter()
                    .chain(keys.values().map(|(_, k)| k));
                let first = tried.next().map(|k| self.decode(token, k));
                match first {
                    Some(Err(AuthError::Invalid(why))) => tried
                        .map(|k| self.decode(token, k))
                        .find(Result::is_ok)
                        .unwrap_or(Err(AuthError::Invalid(why))),
                    Some(other) => other,
                    None => Err(AuthError::Invalid("this node has no keys".into())),
                }
            }
        }?;
        self.check_lifetime(&claims)?;
        Ok(claims)
    }

    fn decode(&self, token: &str, key: &DecodingKey) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| decode_error(&e))
    }

    fn check_lifetime(&self, claims: &Claims) -> Result<(), AuthError> {
        if self.max_lifetime_secs == 0 {
            return Ok(());
        }
        let from = claims.iat.unwrap_or_else(warbler_client::auth::now_secs);
        let lifetime = claims.exp.saturating_sub(from);
        if lifetime > self.max_lifetime_secs + LEEWAY_SECS {
            return Err(AuthError::Invalid(format!(
                "it is valid for {lifetime} s, longer than this node accepts (auth.max_lifetime_secs = {}); mint a shorter-lived token",
                self.max_lifetime_secs
            )));
        }
        Ok(())
    }

    /// Verifies and requires `scope`.
    pub fn require(&self, token: &str, scope: Scope) -> Result<Claims, AuthError> {
        let claims = self.verify(token)?;
        if !claims.allows(scope) {
            return Err(AuthError::Forbidden {
                have: claims.scope,
                need: scope.as_str(),
            });
        }
        Ok(claims)
    }
}

fn decode_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::Invalid(
            "bad signature (was it minted with one of this cluster's keys?)".into(),
        ),
        ErrorKind::ImmatureSignature => {
            AuthError::Invalid("it is not valid yet (nbf is in the future)".into())
        }
        ErrorKind::InvalidIssuer => {
            AuthError::Invalid("its iss is not the issuer this node accepts (auth.issuer)".into())
        }
        ErrorKind::InvalidAudience => {
            AuthError::Invalid("its aud does not name this service (auth.audience)".into())
        }
        ErrorKind::MissingRequiredClaim(c) => {
            AuthError::Invalid(format!("the claim {c:?} is required"))
        }
        _ => AuthError::Invalid(e.to_string()),
    }
}

fn check_length(name: &str, secret: &[u8]) -> Result<(), SecretError> {
    if secret.len() < SECRET_BYTES_MIN {
        return Err(SecretError::TooShort(name.to_string(), secret.len()));
    }
    Ok(())
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    warn_if_readable(path);
    warbler_client::auth::read_secret(path).map_err(|e| SecretError::Unreadable {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Warns when others than the owner may read a secret file.
fn warn_if_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        // Group-readable is a deliberate share (Kubernetes and Compose secrets reach the
        // node through its group); anyone else, or a group that can write, is not.
        if mode & 0o027 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", mode & 0o777), "a secret file is readable by other users; chmod 600 it (or 640 for the node's group)");
        }
    }
}

/// The regular files of `dir` (hidden ones skipped, as Kubernetes keeps its bookkeeping in
/// them), by name.
fn read_keys_dir(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, SecretError> {
    let err = |e: std::io::Error| SecretError::KeysDir {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    let mut keys = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let secret = warbler_client::auth::read_secret(&path).map_err(err)?;
        check_length(&format!("key {name:?}"), &secret)?;
        keys.insert(name, secret);
        if keys.len() > KEYS_MAX {
            return Err(SecretError::TooManyKeys(dir.display().to_string()));
        }
    }
    Ok(keys)
}

/// A message id from the clock and randomness, for commands that publish once.
pub fn now_ms_id() -> String {
    format!(
        "{}-{:08x}",
        warbler_storage::now_ms(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use warbler_client::auth::now_secs;

    use super::*;

    fn claims(scope: &str, exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            scope: scope.into(),
            exp,
            iat: None,
            device: None,
            nbf: None,
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn minted_tokens_verify_and_scopes_are_checked() {
        let auth = Auth::new(b"0123456789abcdef0123").unwrap();
        let t = auth.mint(&claims("device publish", now_secs() + 60));
        let c = auth.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.allows(Scope::Device) && c.allows(Scope::Publish) && !c.allows(Scope::Admin));
        let t = auth.mint(&claims("device", now_secs() + 60));
        assert!(matches!(
            auth.require(&t, Scope::Publish),
            Err(AuthError::Forbidden { .. })
        ));
        let admin = auth.mint(&claims("admin", now_secs() + 60));
        assert!(auth.require(&admin, Scope::Publish).is_ok());
    }

    #[test]
    fn expired_wrong_secret_and_garbage_are_refused() {
        let auth = Auth::new(b"0123456789abcdef0123").unwrap();
        let old = auth.mint(&claims("device", now_secs() - 3600));
        assert_eq!(auth.verify(&old), Err(AuthError::Expired));
        let other = Auth::new(b"another-secret-of-enough-bytes").unwrap();
        let t = other.mint(&claims("device", now_secs() + 60));
        assert!(matches!(auth.verify(&t), Err(AuthError::Invalid(_))));
        assert!(matches!(
            auth.verify("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn short_secrets_are_refused() {
        let e = Auth::new(b"short").err().unwrap();
        assert_eq!(e, SecretError::TooShort("file".into(), 5));
        assert!(e.to_string().contains("at least 16"));
    }

    fn config(dir: Option<&Path>) -> AuthConfig {
        AuthConfig {
            keys_dir: dir.map(Path::to_path_buf),
            ..AuthConfig::default()
        }
    }

    fn signed(secret: &[u8], c: &Claims, kid: Option<&str>) -> String {
        warbler_client::auth::mint_with_kid(secret, c, kid)
    }

    #[test]
    fn keys_rotate_by_kid_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (b"old-key-0123456789abcdef", b"new-key-0123456789abcdef");
        std::fs::write(dir.path().join("k1"), old).unwrap();
        std::fs::write(dir.path().join(".hidden"), b"short").unwrap();
        let auth = Auth::from_config(None, &config(Some(dir.path()))).unwrap();
        let c = claims("device", now_secs() + 60);
        let by_old = signed(old, &c, Some("k1"));
        assert_eq!(auth.verify(&by_old).unwrap().sub, "alice");
        assert!(
            auth.verify(&signed(old, &c, None)).is_ok(),
            "no kid: every key is tried"
        );
        let by_new = signed(new, &c, Some("k2"));
        assert!(matches!(auth.verify(&by_new), Err(AuthError::Invalid(w)) if w.contains("\"k2\"")));

        std::fs::write(dir.path().join("k2"), new).unwrap();
        assert!(auth.reload().unwrap());
        assert!(
            auth.verify(&by_old).is_ok() && auth.verify(&by_new).is_ok(),
            "overlap"
        );
        assert!(!auth.reload().unwrap(), "nothing changed");

        std::fs::remove_file(dir.path().join("k1")).unwrap();
        assert!(auth.reload().unwrap());
        assert!(matches!(auth.verify(&by_old), Err(AuthError::Invalid(_))));
        assert!(auth.verify(&by_new).is_ok());
        // The wrong key under a known kid is a bad signature.
        assert!(
            matches!(auth.verify(&signed(old, &c, Some("k2"))), Err(AuthError::Invalid(w)) if w.contains("signature"))
        );

        // A bad key keeps the loaded ones in use.
        std::fs::write(dir.path().join("k3"), b"short").unwrap();
        assert!(matches!(auth.reload(), Err(SecretError::TooShort(..))));
        assert!(auth.verify(&by_new).is_ok());
    }

    #[test]
    fn a_node_without_any_key_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let e = Auth::from_config(None, &config(Some(dir.path())))
            .err()
            .unwrap();
        assert_eq!(e, SecretError::None);
        assert!(Auth::from_config(None, &config(None)).is_err());
        let missing = dir.path().join("nope");
        assert!(matches!(
            Auth::from_config(None, &config(Some(&missing))),
            Err(SecretError::KeysDir { .. })
        ));
    }

    #[test]
    fn issuer_audience_not_before_and_lifetime_are_checked() {
        let secret = b"0123456789abcdef0123";
        let auth = Auth::build(
            Some(secret.to_vec()),
            &AuthConfig {
                issuer: Some("https://id.example".into()),
                audience: Some("warbler".into()),
                max_lifetime_secs: 3600,
                ..AuthConfig::default()
            },
        )
        .unwrap();
        let now = now_secs();
        let good = Claims {
            iss: Some("https://id.example".into()),
            aud: Some("warbler".into()),
            iat: Some(now),
            ..claims("device", now + 600)
        };
        assert!(auth.verify(&signed(secret, &good, None)).is_ok());
        let refused = |c: &Claims, why: &str| {
            let e = auth.verify(&signed(secret, c, None)).unwrap_err();
            assert!(e.to_string().contains(why), "{e} should mention {why}");
        };
        refused(
            &Claims {
                iss: Some("evil".into()),
                ..good.clone()
            },
            "iss",
        );
        refused(
            &Claims {
                iss: None,
                ..good.clone()
            },
            "iss",
        );
        refused(
            &Claims {
                aud: Some("other".into()),
                ..good.clone()
            },
            "aud",
        );
        refused(
            &Claims {
                nbf: Some(now + 600),
                ..good.clone()
            },
            "nbf",
        );
        refused(
            &Claims {
                exp: now + 7200,
                ..good.clone()
            },
            "max_lifetime_secs",
        );
        refused(
            &Claims {
                iat: None,
                exp: now + 7200,
                ..good.clone()
            },
            "max_lifetime_secs",
        );
        let open = Auth::new(secret).unwrap();
        assert!(
            open.verify(&signed(
                secret,
                &Claims {
                    aud: Some("any".into()),
                    ..good.clone()
                },
                None
            ))
            .is_ok(),
            "without auth.audience an aud is not checked"
        );
        assert!(
            open.verify(&signed(
                secret,
                &Claims {
                    nbf: Some(now + 600),
                    ..good
                },
                None
            ))
            .is_err(),
            "nbf is always honoured"
        );
    }
}
