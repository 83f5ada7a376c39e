//! The cluster key: a secret every member shares, which a host must prove it holds before
//! the cluster listens to it.
//!
//! - Peer connections: a challenge and response in both directions right after `hello`
//!   (see [`crate::transport`]). Each side sends a fresh random nonce and answers with
//!   HMAC-SHA256 over both nonces and the dialer's name, under a label that differs by
//!   direction, so no answer can be replayed or reflected back.
//! - Gossip: every datagram ends with a truncated HMAC-SHA256 tag of its bytes
//!   ([`ClusterKey::seal`], [`ClusterKey::open`]); a datagram without a valid tag is dropped
//!   before SWIM sees it.
//!
//! The key authenticates; it does not encrypt. Mutual TLS on top keeps peer traffic private.

use std::path::Path;

use ::ring::hmac;
use ::ring::rand::{SecureRandom, SystemRandom};

/// Shortest key accepted, in bytes (after trimming surrounding whitespace).
pub const KEY_BYTES_MIN: usize = 32;
/// Bytes of the HMAC tag each gossip datagram carries.
pub const GOSSIP_TAG_BYTES: usize = 16;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;

/// Which side of a peer connection a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The node that dialled.
    Dialer,
    /// The node that accepted.
    Acceptor,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Dialer => b"warbler peer dialer v1",
            Side::Acceptor => b"warbler peer acceptor v1",
        }
    }
}

/// The shared secret, ready to sign and verify.
#[derive(Clone)]
pub struct ClusterKey {
    peer: hmac::Key,
    gossip: hmac::Key,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why the cluster key cannot be used; the text names the file and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl ClusterKey {
    /// A key from its secret bytes (at least [`KEY_BYTES_MIN`]).
    pub fn new(secret: &[u8]) -> Result<ClusterKey, KeyError> {
        if secret.len() < KEY_BYTES_MIN {
            return Err(KeyError(format!(
                "the cluster key has {} bytes; it needs at least {KEY_BYTES_MIN}: make one with `head -c 32 /dev/urandom | base64`",
                secret.len()
            )));
        }
        // Separate keys per use, so a gossip tag can never stand in for a handshake proof.
        let derive = |label: &[u8]| {
            let k = hmac::Key::new(hmac::HMAC_SHA256, secret);
            hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&k, label).as_ref())
        };
        Ok(ClusterKey {
            peer: derive(b"warbler cluster key: peer"),
            gossip: derive(b"warbler cluster key: gossip"),
        })
    }

    /// Reads the key from `path` (surrounding whitespace ignored). A file that others may
    /// read is used, with a warning.
    pub fn from_file(path: &Path) -> Result<ClusterKey, KeyError> {
        let bytes = std::fs::read(path).map_err(|e| {
            KeyError(format!(
                "cannot read the cluster key file {}: {e}; create it with `head -c 32 /dev/urandom | base64 > {}` and give every node the same file",
                path.display(),
                path.display()
            ))
        })?;
        warn_if_readable_by_others(path);
        ClusterKey::new(bytes.trim_ascii())
            .map_err(|KeyError(e)| KeyError(format!("{}: {e}", path.display())))
    }

    /// A fresh random nonce for a handshake.
    pub fn nonce() -> [u8; NONCE_BYTES] {
        let mut n = [0u8; NONCE_BYTES];
        SystemRandom::new()
            .fill(&mut n)
            .expect("the system random source works");
        n
    }

    /// What `side` sends to prove it holds the key, for the connection of `dialer` with
    /// the dialer's nonce `nd` and the acceptor's nonce `na`.
    pub fn prove(&self, side: Side, dialer: &str, nd: &[u8], na: &[u8]) -> Vec<u8> {
        self.proof_tag(side, dialer, nd, na).as_ref().to_vec()
    }

    /// Whether `proof` is what `side` must send (compared in constant time).
    pub fn verify(&self, side: Side, dialer: &str, nd: &[u8], na: &[u8], proof: &[u8]) -> bool {
        hmac::verify(&self.peer, &self.proof_input(side, dialer, nd, na), proof).is_ok()
    }

    fn proof_input(&self, side: Side, dialer: &str, nd: &[u8], na: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(64 + nd.len() + na.len() + dialer.len());
        for part in [side.label(), nd, na, dialer.as_bytes()] {
            m.extend_from_slice(&(part.len() as u32).to_be_bytes());
            m.extend_from_slice(part);
        }
        m
    }

    fn proof_tag(&self, side: Side, dialer: &str, nd: &[u8], na: &[u8]) -> hmac::Tag {
        hmac::sign(&self.peer, &self.proof_input(side, dialer, nd, na))
    }

    /// `datagram` followed by its tag.
    pub fn seal(&self, datagram: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&self.gossip, datagram);
        let mut out = Vec::with_capacity(datagram.len() + GOSSIP_TAG_BYTES);
        out.extend_from_slice(datagram);
        out.extend_from_slice(&tag.as_ref()[..GOSSIP_TAG_BYTES]);
        out
    }

    /// The datagram inside `sealed` when its tag is right.
    pub fn open<'a>(&self, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let body_len = sealed.len().checked_sub(GOSSIP_TAG_BYTES)?;
        let (body, tag) = sealed.split_at(body_len);
        let expected = hmac::sign(&self.gossip, body);
        constant_time_eq(&expected.as_ref()[..GOSSIP_TAG_BYTES], tag).then_some(body)
    }
}

/// This node's own signing key (Ed25519), kept in its data directory: it signs the node's
/// gossip metadata, so that no other member, even one holding the cluster key, can announce
/// metadata in its name while it is up (see [`crate::membership`]).
pub struct NodeSigner {
    pair: ::ring::signature::Ed25519KeyPair,
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeSigner(..)")
    }
}

impl NodeSigner {
    /// A new random key, kept nowhere (tests, and nodes without a data directory).
    pub fn generate() -> NodeSigner {
        let pkcs8 = ::ring::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the system random source works");
        NodeSigner {
            pair: ::ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
                .expect("a fresh key parses"),
        }
    }

    /// The key in `path`, created (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<NodeSigner, KeyError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            KeyError(format!(
                "{what} the node's signing key {}: {e}; it is this node's own (not shared): delete it to make a new one",
                path.display()
            ))
        };
        match std::fs::read(path) {
            Ok(bytes) => ::ring::signature::Ed25519KeyPair::from_pkcs8(&bytes)
                .map(|pair| NodeSigner { pair })
                .map_err(|e| fail("cannot parse", &e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pkcs8 = ::ring::signature::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .expect("the system random source works");
                write_private(path, pkcs8.as_ref()).map_err(|e| fail("cannot write", &e))?;
                NodeSigner::load_or_create(path)
            }
            Err(e) => Err(fail("cannot read", &e)),
        }
    }

    /// The public half, which the node's metadata carries.
    pub fn public_key(&self) -> Vec<u8> {
        use ::ring::signature::KeyPair;
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// Whether `signature` over `message` was made with the key whose public half is
    /// `public_key`.
    pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
        ::ring::signature::UnparsedPublicKey::new(&::ring::signature::ED25519, public_key)
            .verify(message, signature)
            .is_ok()
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        // Group-readable is a deliberate share (Kubernetes and Compose secrets reach the
        // node through its group); anyone else, or a group that can write, is not.
        if mode & 0o027 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the cluster key file can be read by other users; restrict it with `chmod 600` (or 640 for the node's group)"
            );
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClusterKey {
        ClusterKey::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_short_key_is_refused_with_how_to_make_one() {
        let e = ClusterKey::new(b"short").unwrap_err().to_string();
        assert!(e.contains("at least 32") && e.contains("urandom"), "{e}");
    }

    #[test]
    fn proofs_bind_the_key_the_side_the_nonces_and_the_dialer() {
        let k = key("0123456789abcdef0123456789abcdef");
        let other = key("0123456789abcdef0123456789abcdeX");
        let (nd, na) = (ClusterKey::nonce(), ClusterKey::nonce());
        assert_ne!(nd, na);
        let p = k.prove(Side::Dialer, "n1", &nd, &na);
        assert!(k.verify(Side::Dialer, "n1", &nd, &na, &p));
        assert!(!other.verify(Side::Dialer, "n1", &nd, &na, &p));
        assert!(!k.verify(Side::Acceptor, "n1", &nd, &na, &p), "reflected");
        assert!(!k.verify(Side::Dialer, "n2", &nd, &na, &p));
        assert!(!k.verify(Side::Dialer, "n1", &na, &nd, &p));
        assert!(!k.verify(Side::Dialer, "n1", &nd, &na, &p[..31]));
    }

    #[test]
    fn a_node_key_is_kept_and_signs_what_only_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let a = NodeSigner::load_or_create(&path).unwrap();
        let again = NodeSigner::load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), again.public_key(), "kept across starts");
        let sig = a.sign(b"meta");
        assert!(NodeSigner::verify(&a.public_key(), b"meta", &sig));
        assert!(!NodeSigner::verify(&a.public_key(), b"metA", &sig));
        let other = NodeSigner::generate();
        assert!(!NodeSigner::verify(&other.public_key(), b"meta", &sig));
        std::fs::write(&path, b"garbage").unwrap();
        let e = NodeSigner::load_or_create(&path).unwrap_err().to_string();
        assert!(e.contains("delete it"), "{e}");
    }

    #[test]
    fn a_gossip_datagram_opens_only_untouched_and_under_the_same_key() {
        let k = key("0123456789abcdef0123456789abcdef");
        let sealed = k.seal(b"swim says hello");
        assert_eq!(k.open(&sealed), Some(&b"swim says hello"[..]));
        let mut flipped = sealed.clone();
        flipped[3] ^= 1;
        assert_eq!(k.open(&flipped), None);
        assert_eq!(k.open(&sealed[..sealed.len() - 1]), None);
        assert_eq!(k.open(b"short"), None);
        assert_eq!(key("another key, 32 bytes long......").open(&sealed), None);
    }
}
