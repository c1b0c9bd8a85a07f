//! Conversation ids: a pair of users (`dm:<a>:<b>`, the two ids in byte order, so that
//! both directions are one conversation) or a room (`room:<name>`). User ids and room
//! names are checked where they enter (`chat`); here an id is only ever built from them.

use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConvId(Arc<str>);

impl ConvId {
    /// The conversation of users `a` and `b`, whichever writes.
    pub fn direct(a: &str, b: &str) -> Self {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        ConvId(format!("dm:{first}:{second}").into())
    }

    pub fn room(name: &str) -> Self {
        ConvId(format!("room:{name}").into())
    }

    /// An id as stored: `dm:<a>:<b>` with a ≤ b, or `room:<name>`, and no NUL byte (the
    /// store's keys end an id with one).
    pub fn from_stored(id: &str) -> Option<Self> {
        if id.contains('\0') {
            return None;
        }
        let ok = match id.split_once(':') {
            Some(("dm", pair)) => pair
                .split_once(':')
                .is_some_and(|(a, b)| !a.is_empty() && !b.contains(':') && a <= b),
            Some(("room", name)) => !name.is_empty(),
            _ => false,
        };
        ok.then(|| ConvId(id.into()))
    }

    /// The two users of a direct conversation (`None` for a room).
    pub fn direct_users(&self) -> Option<(&str, &str)> {
        self.0.strip_prefix("dm:")?.split_once(':')
    }

    /// The room of a room conversation.
    pub fn room_name(&self) -> Option<&str> {
        self.0.strip_prefix("room:")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_are_one_conversation() {
        assert_eq!(ConvId::direct("bob", "alice"), ConvId::direct("alice", "bob"));
        assert_eq!(ConvId::direct("bob", "alice").as_str(), "dm:alice:bob");
        assert_eq!(ConvId::room("lobby").as_str(), "room:lobby");
    }

    #[test]
    fn stored_ids_are_checked() {
        for ok in ["dm:alice:bob", "dm:a:a", "room:lobby"] {
            assert_eq!(ConvId::from_stored(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "dm:bob:alice",
            "dm:alice",
            "dm::bob",
            "room:",
            "chat:x",
            "dm:a:b:c",
            "room:a\0",
        ] {
            assert!(ConvId::from_stored(bad).is_none(), "{bad:?}");
        }
    }
}
