//! Tokens for the harness's clients, signed with the secret it gives its cluster.

use jsonwebtoken::{EncodingKey, Header};

/// The JWT secret of every cluster the harness starts.
pub const SECRET: &str = "warbler-chaos-secret-0123456789abcdef";

#[derive(serde::Serialize)]
struct Claims<'a> {
    sub: &'a str,
    scope: &'a str,
    exp: u64,
}

/// A token for `user` with `scope` (device, publish or admin), valid for a day.
pub fn token(user: &str, scope: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    jsonwebtoken::encode(
        &Header::default(),
        &Claims {
            sub: user,
            scope,
            exp,
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}
