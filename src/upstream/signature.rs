//! Webhook signatures: the agent backends can tell the gateway's requests from anyone else's.
//! Each POST carries `X-Agentwire-Timestamp` (Unix seconds) and
//! `X-Agentwire-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">` with
//! `upstream.signing_secret`; the receiver recomputes it and refuses old timestamps (replays).

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "x-agentwire-timestamp";
pub const SIGNATURE_HEADER: &str = "x-agentwire-signature";

/// The two headers of a request carrying `body`, signed now.
pub fn headers(secret: &str, body: &str) -> [(&'static str, String); 2] {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    [
        (TIMESTAMP_HEADER, now.to_string()),
        (SIGNATURE_HEADER, sign(secret, now, body)),
    ]
}

/// `v1=<hex>` for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: u64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_a_known_vector() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'secret'
        assert_eq!(
            super::sign("secret", 1_700_000_000, r#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }
}
