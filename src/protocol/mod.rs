//! The wire formats: producer events in, client frames in, server frames out.
//! Everything here is pure: decoding and encoding, no I/O.

pub mod agui;
pub mod channel;
pub mod client;
pub mod event;
pub mod json;
pub mod packed;
pub mod run;
mod scan;
pub mod server;
pub mod upstream;

pub use channel::{ChannelKind, ChannelName};

/// At most this many characters of client input are quoted back in an error.
const EXCERPT_CHARS: usize = 32;

/// What an error may quote of client input: the first characters, marked when cut, so an error
/// frame or body never carries back a large or crafted input.
pub fn excerpt(input: &str) -> String {
    match input.char_indices().nth(EXCERPT_CHARS) {
        Some((at, _)) => format!("{}…", &input[..at]),
        None => input.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn excerpts_are_short() {
        assert_eq!(super::excerpt("short"), "short");
        let long = "x".repeat(5000);
        assert_eq!(super::excerpt(&long).chars().count(), 33);
        assert_eq!(
            super::excerpt(&"é".repeat(40)),
            format!("{}…", "é".repeat(32))
        );
    }
}
