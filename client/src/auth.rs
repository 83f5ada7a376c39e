//! Tokens: the JWT claims every Warbler token carries and the one place they are minted
//! (HS256). The server verifies them (`src/auth.rs`); `warbler token`, the chaos harness,
//! the benchmarks and the tests mint them here.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Device,
    Publish,
    /// Operations: the cluster's state (`GET /v1/cluster`), decommissioning, and
    /// `/metrics` where the node requires a token for it.
    Ops,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Device => "device",
            Scope::Publish => "publish",
            Scope::Ops => "ops",
            Scope::Admin => "admin",
        }
    }
}

/// A token's claims: `sub` is the user, `scope` lists what the bearer may do (`device`,
/// `publish`, `ops`, `admin`; space- or comma-separated), `exp` is required.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub scope: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// When set, the token is valid only for this device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Not valid before this time (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Who issued the token (checked when the node sets `auth.issuer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Whom the token is for (checked when the node sets `auth.audience`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    /// Claims for `user` with `scope`, valid for `ttl_secs` from now.
    pub fn new(user: &str, scope: &str, ttl_secs: u64) -> Claims {
        let now = now_secs();
        Claims {
            sub: user.to_string(),
            scope: scope.to_string(),
            exp: now + ttl_secs,
            iat: Some(now),
            device: None,
            nbf: None,
            iss: None,
            aud: None,
        }
    }

    /// True if the token grants `scope` (`admin` grants everything).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scope
            .split([' ', ','])
            .any(|s| s == scope.as_str() || s == Scope::Admin.as_str())
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs `claims` with `secret` (HS256).
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    mint_with_kid(secret, claims, None)
}

/// Signs `claims` with `secret` (HS256), naming the key id `kid` in the header (a node
/// with `auth.keys_dir` verifies it with the file of that name).
pub fn mint_with_kid(secret: &[u8], claims: &Claims, kid: Option<&str>) -> String {
    let header = Header {
        kid: kid.map(str::to_string),
        ..Header::new(Algorithm::HS256)
    };
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
        .expect("HS256 encoding does not fail")
}

/// A token for `user` with `scope`, valid for `ttl_secs`.
pub fn token(secret: &[u8], user: &str, scope: &str, ttl_secs: u64) -> String {
    mint(secret, &Claims::new(user, scope, ttl_secs))
}

/// Reads a secret file the way the server does (surrounding whitespace is not part of it).
pub fn read_secret(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let bytes = std::fs::read(path)?;
    Ok(String::from_utf8_lossy(&bytes).trim().as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_allows_everything_and_scopes_split_on_spaces_and_commas() {
        let c = Claims::new("u", "device,publish", 60);
        assert!(c.allows(Scope::Device) && c.allows(Scope::Publish));
        assert!(!c.allows(Scope::Admin));
        assert!(Claims::new("u", "admin", 60).allows(Scope::Publish));
        assert!(!Claims::new("u", "devices", 60).allows(Scope::Device));
        assert!(Claims::new("u", "admin", 60).allows(Scope::Ops));
        let ops = Claims::new("u", "ops", 60);
        assert!(
            ops.allows(Scope::Ops) && !ops.allows(Scope::Publish) && !ops.allows(Scope::Device)
        );
    }

    #[test]
    fn a_minted_token_carries_its_claims() {
        let t = token(b"0123456789abcdef", "alice", "device", 60);
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let key = jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef");
        let c = jsonwebtoken::decode::<Claims>(&t, &key, &v).unwrap().claims;
        assert_eq!((c.sub.as_str(), c.scope.as_str()), ("alice", "device"));
        assert!(c.exp >= now_secs() + 59);
    }
}
