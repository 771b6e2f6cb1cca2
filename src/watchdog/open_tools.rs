//! A run's open tool calls, bounded in number and in bytes whatever the producer sends: each is
//! kept as a keyed 64-bit hash of its `tool_call_id` (enough to match its `tool_completed`), and
//! only the first few also as the id itself, to show at `GET /v1/runs` and in the stall notice.

use crate::hashed::KeyHasher;

/// Open tool calls followed per run; more are not followed (a later `tool_completed` of one of
/// them counts as `tool_completed_without_executing`).
pub const MAX_OPEN_TOOLS: usize = 256;
/// Open tool call ids kept in full per run, to show.
pub const SHOWN_TOOL_IDS: usize = 4;

#[derive(Debug, Default)]
pub struct OpenTools {
    /// Every open tool call, as a hash, in the order they started.
    hashes: Vec<u64>,
    /// The ids of some open tool calls (at most [`SHOWN_TOOL_IDS`]), in the order they started.
    shown: Vec<Box<str>>,
}

impl OpenTools {
    /// A tool call started. Returns `false` when the run already has [`MAX_OPEN_TOOLS`] open.
    pub fn open(&mut self, id: &str, keys: &KeyHasher) -> bool {
        if self.hashes.len() >= MAX_OPEN_TOOLS {
            return false;
        }
        self.hashes.push(keys.hash(id).hash);
        if self.shown.len() < SHOWN_TOOL_IDS {
            self.shown.push(id.into());
        }
        true
    }

    /// A tool call completed. Returns `false` when it was not open.
    pub fn close(&mut self, id: &str, keys: &KeyHasher) -> bool {
        let hash = keys.hash(id).hash;
        let Some(index) = self.hashes.iter().position(|open| *open == hash) else {
            return false;
        };
        self.hashes.remove(index);
        if let Some(index) = self.shown.iter().position(|open| &**open == id) {
            self.shown.remove(index);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// At most [`SHOWN_TOOL_IDS`] ids of open tool calls.
    pub fn shown(&self) -> Vec<String> {
        self.shown.iter().map(|id| id.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_number_and_in_ids_kept() {
        let keys = KeyHasher::default();
        let mut tools = OpenTools::default();
        let long = "x".repeat(200);
        for n in 0..MAX_OPEN_TOOLS {
            assert!(tools.open(&format!("{long}{n}"), &keys));
        }
        assert!(!tools.open("one_more", &keys), "past the cap");
        assert_eq!(tools.len(), MAX_OPEN_TOOLS);
        assert_eq!(tools.shown().len(), SHOWN_TOOL_IDS);
        assert!(tools.close(&format!("{long}0"), &keys));
        assert!(!tools.close(&format!("{long}0"), &keys), "closed once");
        assert!(!tools.close("one_more", &keys), "never followed");
        assert!(
            tools.close(&format!("{long}200"), &keys),
            "not shown, still matched"
        );
        assert_eq!(tools.len(), MAX_OPEN_TOOLS - 2);
        assert_eq!(tools.shown(), [1, 2, 3].map(|n| format!("{long}{n}")));
    }
}
