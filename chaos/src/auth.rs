//! Tokens for the harness's clients, signed with the secret it gives its cluster.

/// The JWT secret of every cluster the harness starts.
pub const SECRET: &str = "warbler-chaos-secret-0123456789abcdef";

/// A token for `user` with `scope` (device, publish or admin), valid for a day.
pub fn token(user: &str, scope: &str) -> String {
    warbler_client::auth::token(SECRET.as_bytes(), user, scope, 86_400)
}
