//! JWT authentication: HS256 tokens whose `sub` is the user and whose `scope` lists what
//! the bearer may do (`device`, `publish`, `admin`; space- or comma-separated).

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// Shortest accepted HS256 secret, in bytes: shorter ones are guessable.
pub const SECRET_BYTES_MIN: usize = 16;
/// Clock skew tolerated on `exp`, in seconds.
const LEEWAY_SECS: u64 = 5;

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
    #[error("the JWT secret is {0} bytes; use at least {SECRET_BYTES_MIN} random bytes (e.g. `openssl rand -hex 32`)")]
    TooShort(usize),
    #[error("cannot read the JWT secret file {path}: {message}; pass --jwt-secret-file with a readable file")]
    Unreadable { path: String, message: String },
}

/// Mints and verifies tokens with one HS256 secret.
pub struct Auth {
    secret: Vec<u8>,
    decoding: DecodingKey,
    validation: Validation,
}

impl Auth {
    pub fn new(secret: &[u8]) -> Result<Auth, SecretError> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(SecretError::TooShort(secret.len()));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Auth {
            secret: secret.to_vec(),
            decoding: DecodingKey::from_secret(secret),
            validation,
        })
    }

    /// Reads the secret from a file (surrounding whitespace is not part of it).
    pub fn from_file(path: &Path) -> Result<Auth, SecretError> {
        let secret =
            warbler_client::auth::read_secret(path).map_err(|e| SecretError::Unreadable {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        Auth::new(&secret)
    }

    pub fn mint(&self, claims: &Claims) -> String {
        warbler_client::auth::mint(&self.secret, claims)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => Err(AuthError::Expired),
                ErrorKind::InvalidSignature => Err(AuthError::Invalid(
                    "bad signature (was it minted with this cluster's secret?)".into(),
                )),
                _ => Err(AuthError::Invalid(e.to_string())),
            },
        }
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
        assert_eq!(e, SecretError::TooShort(5));
        assert!(e.to_string().contains("at least 16"));
    }
}
