//! A node's one order per conversation when its stored messages come from several places
//! (sans IO). In a cluster, the store assigns `seq`, but the messages of one conversation
//! reach a node from its own store thread and from other nodes through NATS, and two of
//! them appended at the same instant on two nodes may arrive in either order. The
//! sequencer passes each conversation's messages on in `seq` order: one that arrives
//! early is held until the ones before it come, and a gap still open after `hold` (its
//! message went to another node that died before publishing it, or was sent before that
//! node knew of us) is filled from the store by the caller.
//!
//! Where a conversation starts on a node: `seq` 1 of a new conversation, or a message the
//! store says was stored well after the one before it (at least `hold` later, by the
//! store's one clock: that one is not on its way any more). A message that *follows
//! closely* and is the first seen of its conversation is held (the one before may be in
//! flight from another node) until the one before arrives or `hold` passes; then the
//! conversation starts just before it, and the one before is read from the store too.
//! A message older than the start, arriving after it, was never passed on here: it is
//! passed on late (out of order, counted) rather than lost.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::ConvId;

/// Late messages remembered per conversation (to drop a second copy).
const MAX_LATE: usize = 64;

/// How a message was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Passed on (with any held ones it freed).
    InOrder,
    /// Held until the messages before it come or the gap is filled.
    Held,
    /// Passed on already (a gap fill got it first, or it came twice): dropped.
    Duplicate,
    /// Older than where the conversation started on this node: passed on out of order.
    Late,
}

/// A gap to fill from the store: the messages after `after` up to `through` that exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub conv: ConvId,
    pub after: u64,
    pub through: u64,
}

/// What a gap fill passed on from the store, and the seqs no one had.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    pub from_store: u64,
    pub skipped: u64,
}

struct Conv<T> {
    /// The last seq passed on.
    passed: u64,
    /// The seq the conversation started at on this node (older ones are `Late`).
    start: u64,
    /// Whether the start is known; until then every message is held.
    anchored: bool,
    /// Messages older than the start passed on late (the latest few, for telling a second
    /// copy).
    late: BTreeSet<u64>,
    held: BTreeMap<u64, T>,
    /// Since when the oldest gap has been waited for.
    waiting_since: Option<Instant>,
    touched: Instant,
}

pub struct Sequencer<T> {
    convs: HashMap<ConvId, Conv<T>>,
    /// Conversations holding messages behind a gap.
    gapped: HashSet<ConvId>,
    hold: Duration,
}

impl<T> Sequencer<T> {
    pub fn new(hold: Duration) -> Self {
        Sequencer {
            convs: HashMap::new(),
            gapped: HashSet::new(),
            hold,
        }
    }

    /// Message `seq` (from 1) of `conv` arrived; `follows_closely`: the store says it was
    /// stored less than `hold` after the message before it (false when the store cannot
    /// say: its clock kept no recent append). What can be passed on now goes to `out`, in
    /// order.
    pub fn offer(
        &mut self,
        conv: &ConvId,
        seq: u64,
        follows_closely: bool,
        item: T,
        now: Instant,
        out: &mut Vec<(u64, T)>,
    ) -> Arrival {
        let starts = seq == 1 || !follows_closely;
        let state = self.convs.entry(conv.clone()).or_insert_with(|| Conv {
            passed: 0,
            start: 0,
            anchored: false,
            late: BTreeSet::new(),
            held: BTreeMap::new(),
            waiting_since: None,
            touched: now,
        });
        state.touched = now;
        if !state.anchored {
            if state.held.contains_key(&seq) {
                return Arrival::Duplicate;
            }
            let lowest = state.held.keys().next().is_none_or(|&l| seq < l);
            if !(starts && lowest) {
                state.held.insert(seq, item);
                state.waiting_since.get_or_insert(now);
                self.gapped.insert(conv.clone());
                return Arrival::Held;
            }
            state.anchored = true;
            state.start = seq;
            state.passed = seq.saturating_sub(1);
        }
        if seq < state.start {
            if !state.late.insert(seq) {
                return Arrival::Duplicate;
            }
            if state.late.len() > MAX_LATE {
                state.late.pop_first();
            }
            out.push((seq, item));
            return Arrival::Late;
        }
        if seq <= state.passed || state.held.contains_key(&seq) {
            return Arrival::Duplicate;
        }
        if seq > state.passed.saturating_add(1) {
            state.held.insert(seq, item);
            state.waiting_since.get_or_insert(now);
            self.gapped.insert(conv.clone());
            return Arrival::Held;
        }
        out.push((seq, item));
        state.passed = seq;
        release(state, now, out);
        if state.held.is_empty() {
            self.gapped.remove(conv);
        }
        Arrival::InOrder
    }

    /// The earliest instant a gap becomes overdue.
    pub fn next_due(&self) -> Option<Instant> {
        self.gapped
            .iter()
            .filter_map(|c| self.convs.get(c)?.waiting_since)
            .min()
            .map(|t| t + self.hold)
    }

    /// The gaps that have waited `hold`, to read from the store and `fill`. A conversation
    /// not started yet starts just before its lowest held message, whose predecessor
    /// (stored shortly before it, and never arrived) is read too.
    pub fn overdue(&self, now: Instant) -> Vec<Gap> {
        let mut gaps: Vec<Gap> = self
            .gapped
            .iter()
            .filter_map(|c| {
                let state = self.convs.get(c)?;
                let since = state.waiting_since?;
                let through = *state.held.keys().next_back()?;
                let after = match state.anchored {
                    true => state.passed,
                    false => state.held.keys().next()?.saturating_sub(2),
                };
                (now.saturating_duration_since(since) >= self.hold).then(|| Gap {
                    conv: c.clone(),
                    after,
                    through,
                })
            })
            .collect();
        gaps.sort_by(|a, b| a.conv.cmp(&b.conv));
        gaps
    }

    /// Fills `conv`'s gaps up to `through` with `found` (what the store holds of them,
    /// ascending; empty when it could not be read), passing on found and held messages
    /// in order. A seq neither found nor held is skipped: the store no longer has it (or
    /// cannot say), and holding the rest longer would not bring it back.
    pub fn fill(
        &mut self,
        conv: &ConvId,
        through: u64,
        found: impl IntoIterator<Item = (u64, T)>,
        now: Instant,
        out: &mut Vec<(u64, T)>,
    ) -> Filled {
        let mut filled = Filled::default();
        let Some(state) = self.convs.get_mut(conv) else {
            return filled;
        };
        if !state.anchored {
            let Some(&lowest) = state.held.keys().next() else {
                return filled;
            };
            state.anchored = true;
            state.passed = lowest.saturating_sub(2).min(through);
            state.start = state.passed.saturating_add(1);
        }
        // Held and found messages in seq order, stepping over what neither has (by count,
        // not one by one: a seq far ahead must not make this loop long).
        let passed = state.passed;
        let mut found = found
            .into_iter()
            .filter(|(s, _)| *s > passed && *s <= through)
            .peekable();
        loop {
            let held = state.held.keys().next().copied().filter(|&k| k <= through);
            let next = match (held, found.peek().map(|(s, _)| *s)) {
                (None, None) => break,
                (Some(h), Some(f)) => h.min(f),
                (Some(h), None) => h,
                (None, Some(f)) => f,
            };
            filled.skipped += next - state.passed - 1;
            if held == Some(next) {
                let _ = found.next_if(|(s, _)| *s == next);
                if let Some(item) = state.held.remove(&next) {
                    out.push((next, item));
                }
            } else if let Some(item) = found.next() {
                out.push(item);
                filled.from_store += 1;
            }
            state.passed = next;
        }
        filled.skipped += through.saturating_sub(state.passed);
        state.passed = state.passed.max(through);
        state.waiting_since = None;
        release(state, now, out);
        if state.held.is_empty() {
            self.gapped.remove(conv);
        }
        filled
    }

    /// Forgets conversations with nothing held that saw no message for `idle`, and beyond
    /// `max` conversations the least recently active of the rest too (a forgotten one
    /// starts again at its next message, as one not seen before).
    pub fn forget_idle(&mut self, now: Instant, idle: Duration, max: usize) {
        self.convs
            .retain(|_, c| !c.held.is_empty() || now.saturating_duration_since(c.touched) < idle);
        if self.convs.len() <= max {
            return;
        }
        let mut quiet: Vec<(Instant, ConvId)> = self
            .convs
            .iter()
            .filter(|(_, c)| c.held.is_empty())
            .map(|(id, c)| (c.touched, id.clone()))
            .collect();
        quiet.sort_unstable_by_key(|(touched, _)| *touched);
        let excess = self.convs.len() - max;
        for (_, id) in quiet.into_iter().take(excess) {
            self.convs.remove(&id);
        }
    }

    pub fn conversations(&self) -> usize {
        self.convs.len()
    }
}

/// Passes on the held messages that follow `passed`; if some are still held behind a
/// gap, that gap is waited for from now.
fn release<T>(state: &mut Conv<T>, now: Instant, out: &mut Vec<(u64, T)>) {
    while let Some(item) = state.held.remove(&state.passed.saturating_add(1)) {
        state.passed += 1;
        out.push((state.passed, item));
    }
    state.waiting_since = if state.held.is_empty() {
        None
    } else {
        Some(state.waiting_since.unwrap_or(now))
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOLD: Duration = Duration::from_millis(50);

    fn conv() -> ConvId {
        ConvId::direct("alice", "bob")
    }

    fn seqs(out: &[(u64, u64)]) -> Vec<u64> {
        out.iter().map(|(s, _)| *s).collect()
    }

    /// Offers `seq` (with itself as the item) of `conv()`.
    fn offer(
        s: &mut Sequencer<u64>,
        seq: u64,
        follows_closely: bool,
        now: Instant,
        out: &mut Vec<(u64, u64)>,
    ) -> Arrival {
        s.offer(&conv(), seq, follows_closely, seq, now, out)
    }

    #[test]
    fn an_early_message_waits_for_the_one_before_it() {
        let (mut s, now, mut out) = (Sequencer::new(HOLD), Instant::now(), Vec::new());
        assert_eq!(offer(&mut s, 1, true, now, &mut out), Arrival::InOrder);
        assert_eq!(offer(&mut s, 3, true, now, &mut out), Arrival::Held);
        assert_eq!(offer(&mut s, 4, true, now, &mut out), Arrival::Held);
        assert_eq!(seqs(&out), [1]);
        assert_eq!(s.next_due(), Some(now + HOLD));
        assert_eq!(offer(&mut s, 2, true, now, &mut out), Arrival::InOrder);
        assert_eq!(seqs(&out), [1, 2, 3, 4]);
        assert_eq!(s.next_due(), None);
        assert_eq!(offer(&mut s, 3, true, now, &mut out), Arrival::Duplicate);
    }

    #[test]
    fn a_first_message_that_follows_closely_waits_for_the_one_before_it() {
        let (mut s, now, mut out) = (Sequencer::new(HOLD), Instant::now(), Vec::new());
        // 5 and 4 were stored moments after their predecessors: they may be on their way.
        assert_eq!(offer(&mut s, 5, true, now, &mut out), Arrival::Held);
        assert_eq!(offer(&mut s, 4, true, now, &mut out), Arrival::Held);
        // 3 came long after 2: the conversation starts here.
        assert_eq!(offer(&mut s, 3, false, now, &mut out), Arrival::InOrder);
        assert_eq!(seqs(&out), [3, 4, 5]);
        assert_eq!(offer(&mut s, 2, false, now, &mut out), Arrival::Late);
        // Another conversation's first message never sees its predecessor: after the hold
        // it starts just before, and the predecessor is read from the store.
        let room = ConvId::room("r");
        out.clear();
        assert_eq!(s.offer(&room, 8, true, 8, now, &mut out), Arrival::Held);
        let gaps = s.overdue(now + HOLD);
        assert_eq!(
            gaps,
            [Gap {
                conv: room.clone(),
                after: 6,
                through: 8
            }]
        );
        let filled = s.fill(&room, 8, [(7, 70)], now + HOLD, &mut out);
        assert_eq!(
            (filled, out),
            (
                Filled {
                    from_store: 1,
                    skipped: 0
                },
                vec![(7, 70), (8, 8)]
            )
        );
    }

    #[test]
    fn an_overdue_gap_is_filled_from_the_store_and_what_it_lacks_is_skipped() {
        let (mut s, now, mut out) = (Sequencer::new(HOLD), Instant::now(), Vec::new());
        offer(&mut s, 5, false, now, &mut out);
        offer(&mut s, 8, true, now, &mut out);
        offer(&mut s, 10, true, now, &mut out);
        assert!(s.overdue(now + HOLD / 2).is_empty());
        let gaps = s.overdue(now + HOLD);
        assert_eq!(
            gaps,
            [Gap {
                conv: conv(),
                after: 5,
                through: 10
            }]
        );
        // The store has 6, 7 and 9 (and 8, which is held: the held copy goes out).
        let found = [(6, 60), (7, 70), (8, 80), (9, 90)];
        let filled = s.fill(&conv(), 10, found, now + HOLD, &mut out);
        assert_eq!(
            filled,
            Filled {
                from_store: 3,
                skipped: 0
            }
        );
        assert_eq!(out, [(5, 5), (6, 60), (7, 70), (8, 8), (9, 90), (10, 10)]);
        // A message the fill passed on arrives after all: not twice.
        assert_eq!(offer(&mut s, 9, true, now, &mut out), Arrival::Duplicate);
        // A store that could not be read: the gap is skipped, nothing held stays.
        out.clear();
        offer(&mut s, 13, true, now, &mut out);
        assert_eq!(s.fill(&conv(), 13, [], now, &mut out).skipped, 2);
        assert_eq!(seqs(&out), [13]);
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn a_seq_far_ahead_is_skipped_to_by_count() {
        let (mut s, now, mut out) = (Sequencer::new(HOLD), Instant::now(), Vec::new());
        offer(&mut s, 3, false, now, &mut out);
        offer(&mut s, u64::MAX - 1, true, now, &mut out);
        let gaps = s.overdue(now + HOLD);
        assert_eq!(gaps[0].through, u64::MAX - 1);
        let filled = s.fill(&conv(), u64::MAX - 1, [(4, 40), (u64::MAX - 1, 0)], now, &mut out);
        assert_eq!(filled.from_store, 1);
        assert_eq!(filled.skipped, u64::MAX - 1 - 3 - 2);
        assert_eq!(out, [(3, 3), (4, 40), (u64::MAX - 1, u64::MAX - 1)]);
        assert_eq!(offer(&mut s, u64::MAX, true, now, &mut out), Arrival::InOrder);
    }

    #[test]
    fn a_message_older_than_the_start_is_passed_on_late_and_idle_conversations_are_forgotten() {
        let (mut s, now, mut out) = (Sequencer::new(HOLD), Instant::now(), Vec::new());
        offer(&mut s, 7, false, now, &mut out);
        assert_eq!(offer(&mut s, 6, false, now, &mut out), Arrival::Late);
        assert_eq!(seqs(&out), [7, 6]);
        s.offer(&ConvId::room("lobby"), 3, false, 3, now, &mut out);
        s.offer(&ConvId::room("lobby"), 5, true, 5, now, &mut out);
        s.forget_idle(now + Duration::from_secs(60), Duration::from_secs(30), 100);
        assert_eq!(s.conversations(), 1, "the room holds a message behind a gap: kept");
        // Over the cap, the least recently active go first; one holding a message stays.
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let at = now + Duration::from_secs(61 + i as u64);
            s.offer(&ConvId::room(name), 1, false, 1, at, &mut out);
        }
        s.forget_idle(now + Duration::from_secs(70), Duration::from_secs(600), 2);
        assert_eq!(s.conversations(), 2);
        s.offer(&ConvId::room("c"), 2, false, 2, now, &mut out);
        assert_eq!(
            s.offer(&ConvId::room("a"), 2, true, 2, now, &mut out),
            Arrival::Held,
            "a was forgotten"
        );
    }

    proptest! {
        /// Messages 1..=n of two conversations, each stored moments after the one before,
        /// arrive in any order; some never arrive (their node died), some twice; gaps are
        /// filled from a store that has them all. Every message that arrived is passed on
        /// exactly once, and apart from those that came after their conversation had
        /// started past them (`Late`), each conversation goes out in seq order, gapless.
        #[test]
        fn any_arrival_order_is_passed_on_once_and_in_seq_order(
            n in 1u64..40,
            order in proptest::collection::vec(any::<u32>(), 80),
            lost in proptest::collection::vec(any::<bool>(), 80),
            twice in proptest::collection::vec(any::<bool>(), 80),
            fill_every in 1usize..10,
        ) {
            let convs = [ConvId::direct("a", "b"), ConvId::room("r")];
            let mut s = Sequencer::new(HOLD);
            let mut out: HashMap<ConvId, Vec<u64>> = HashMap::new();
            let mut late: HashSet<(usize, u64)> = HashSet::new();
            let mut arrived: HashSet<(usize, u64)> = HashSet::new();
            let mut arrivals: Vec<(u32, usize, u64)> = (1..=n)
                .flat_map(|q| [(0, q), (1, q)])
                .enumerate()
                .map(|(i, (c, q))| (order[i % order.len()], c, q))
                .collect();
            arrivals.sort();
            let mut sequence = Vec::new();
            for (i, (_, c, q)) in arrivals.into_iter().enumerate() {
                if lost[i % lost.len()] { continue; }
                sequence.push((c, q));
                if twice[i % twice.len()] { sequence.push((c, q)); }
            }
            let mut t = Instant::now();
            let mut buf = Vec::new();
            let fill_due = |s: &mut Sequencer<u64>, t: Instant, out: &mut HashMap<ConvId, Vec<u64>>, buf: &mut Vec<(u64, u64)>| {
                for gap in s.overdue(t) {
                    let found = (gap.after + 1..=gap.through).map(|q| (q, q));
                    s.fill(&gap.conv, gap.through, found, t, buf);
                    out.entry(gap.conv.clone()).or_default().extend(buf.drain(..).map(|(q, _)| q));
                }
            };
            for (i, (c, q)) in sequence.into_iter().enumerate() {
                arrived.insert((c, q));
                if s.offer(&convs[c], q, true, q, t, &mut buf) == Arrival::Late {
                    late.insert((c, q));
                }
                out.entry(convs[c].clone()).or_default().extend(buf.drain(..).map(|(q, _)| q));
                t += Duration::from_millis(10);
                if i % fill_every == 0 {
                    fill_due(&mut s, t, &mut out, &mut buf);
                }
            }
            fill_due(&mut s, t + HOLD, &mut out, &mut buf);
            prop_assert_eq!(s.next_due(), None);
            for (c, conv) in convs.iter().enumerate() {
                let got = out.get(conv).cloned().unwrap_or_default();
                let distinct: HashSet<u64> = got.iter().copied().collect();
                prop_assert_eq!(distinct.len(), got.len(), "passed on twice: {:?}", got);
                for &(ac, q) in &arrived {
                    prop_assert!(ac != c || distinct.contains(&q), "{} arrived and was not passed on: {:?}", q, got);
                }
                let in_order: Vec<u64> = got.iter().copied().filter(|q| !late.contains(&(c, *q))).collect();
                prop_assert!(in_order.windows(2).all(|w| w[1] == w[0] + 1), "{:?} (late {:?})", got, late);
            }
        }
    }
}
