//! Invite tokens: one-command trust between two nodes.
//!
//! The inviter makes a token holding its node id, its addresses, an expiry
//! and a 32-byte random secret; it stores only the secret's SHA-256. The
//! joiner pins the inviter's id from the token, connects, and presents the
//! secret on `Federation/Join`; the inviter then trusts the joiner's node id
//! (from its TLS certificate) and burns the invite. Text form:
//! `bitsync-invite:` + unpadded base64url of the `InviteToken` protobuf.

use base64::Engine;
use prost::Message;
use rand::RngCore;

use crate::crypto::{Hash, NodeId};
use crate::error::{Error, Result};
use crate::proto::InviteToken;

const PREFIX: &str = "bitsync-invite:";

#[derive(Debug, Clone)]
pub struct Invite {
    pub node_id: NodeId,
    pub addresses: Vec<String>,
    pub(crate) secret: [u8; 32],
    pub expires_at_ms: i64,
}

impl Invite {
    pub fn new(node_id: NodeId, addresses: Vec<String>, expires_at_ms: i64) -> Invite {
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        Invite {
            node_id,
            addresses,
            secret,
            expires_at_ms,
        }
    }

    /// What the inviter stores instead of the secret.
    pub fn secret_hash(&self) -> Hash {
        Hash::of(&self.secret)
    }

    pub fn encode(&self) -> String {
        let t = InviteToken {
            node_id: self.node_id.to_hex(),
            addresses: self.addresses.clone(),
            secret: self.secret.to_vec(),
            expires_at_ms: self.expires_at_ms,
        };
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.encode_to_vec())
        )
    }

    pub(crate) fn is_token(s: &str) -> bool {
        s.trim().starts_with(PREFIX)
    }

    pub fn decode(s: &str) -> Result<Invite> {
        let bad = |why: &str| {
            Error::invalid(format!("invite token is malformed ({why}); copy the whole last line `bitsync invite` printed"))
        };
        let b64 = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("missing prefix"))?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| bad("not base64url"))?;
        let t = InviteToken::decode(bytes.as_slice()).map_err(|_| bad("does not decode"))?;
        let node_id = Hash::parse(&t.node_id, "node id").map_err(|_| bad("node id"))?;
        let secret: [u8; 32] = t.secret.as_slice().try_into().map_err(|_| bad("secret"))?;
        if t.addresses.is_empty() {
            return Err(bad("no address"));
        }
        Ok(Invite {
            node_id,
            addresses: t.addresses,
            secret,
            expires_at_ms: t.expires_at_ms,
        })
    }

    /// The secret as sent in `JoinRequest.secret`.
    pub fn secret_text(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret)
    }
}

/// Hash a `JoinRequest.secret` for lookup.
pub(crate) fn hash_secret_text(s: &str) -> Result<Hash> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim())
        .map_err(|_| Error::auth("invite secret is not valid"))?;
    if b.len() != 32 {
        return Err(Error::auth("invite secret is not valid"));
    }
    Ok(Hash::of(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let i = Invite::new(Hash::of(b"n"), vec!["127.0.0.1:7450".into()], 42);
        let d = Invite::decode(&i.encode()).unwrap();
        assert_eq!(d.node_id, i.node_id);
        assert_eq!(d.secret, i.secret);
        assert_eq!(hash_secret_text(&i.secret_text()).unwrap(), i.secret_hash());
        assert!(Invite::decode("bitsync-invite:!!").is_err());
    }
}
