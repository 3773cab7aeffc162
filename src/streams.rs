//! Per-stream state kept by the wasm glue between callbacks, from the host's context create to its delete.
//! Plain Rust, so its bounds are tested on the host.
//!
//! - [`Pending`]: each new stream's config root, from its create to its request headers. Envoy creates a
//!   stream's context as it decodes the stream's headers, so this holds about one entry: a short list, with
//!   no allocation per request (a map allocated and freed a node on every request: +2.4k instructions).
//! - [`Streams`]: values that live longer, such as an assigned `set-cookie` waiting for the response
//!   (only requests that got a new cookie use it).
//!
//! Entries leave when the host deletes the stream. The bound only matters with a host that never does:
//! past [`MAX_STREAMS`] entries, the oldest one is dropped, one at a time. Nothing is ever cleared
//! wholesale, so no value of a live stream is lost to a burst of other streams.

use std::collections::BTreeMap;

/// Streams tracked at once, per VM (one per Envoy worker).
pub const MAX_STREAMS: usize = 1 << 16;

/// Each new stream's root context id, oldest first, until its request headers (or its delete).
#[derive(Debug)]
pub struct Pending {
    entries: Vec<(u32, u32)>,
    limit: usize,
}

impl Default for Pending {
    fn default() -> Self {
        Self::with_limit(MAX_STREAMS)
    }
}

impl Pending {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            entries: Vec::new(),
            limit: limit.max(1),
        }
    }

    /// A new stream of `root`; returns the stream dropped to stay within the bound, if one was.
    pub fn insert(&mut self, stream: u32, root: u32) -> Option<u32> {
        self.entries.push((stream, root));
        if self.entries.len() > self.limit {
            return Some(self.entries.remove(0).0);
        }
        None
    }

    /// The root of `stream`, which leaves the list. Looked up from the newest: usually the last entry.
    pub fn take(&mut self, stream: u32) -> Option<u32> {
        let at = self.entries.iter().rposition(|&(id, _)| id == stream)?;
        Some(self.entries.remove(at).1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Values by stream context id, oldest (lowest id: hosts number contexts upwards) first.
#[derive(Debug)]
pub struct Streams<T> {
    by_id: BTreeMap<u32, T>,
    limit: usize,
}

impl<T> Default for Streams<T> {
    fn default() -> Self {
        Self::with_limit(MAX_STREAMS)
    }
}

impl<T> Streams<T> {
    pub fn with_limit(limit: usize) -> Self {
        Self {
            by_id: BTreeMap::new(),
            limit: limit.max(1),
        }
    }

    /// A new stream; returns the id of the stream dropped to stay within the bound, if one was.
    pub fn insert(&mut self, id: u32, value: T) -> Option<u32> {
        self.by_id.insert(id, value);
        if self.by_id.len() > self.limit {
            return self.by_id.pop_first().map(|(oldest, _)| oldest);
        }
        None
    }

    pub fn get(&self, id: u32) -> Option<&T> {
        self.by_id.get(&id)
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.by_id.get_mut(&id)
    }

    /// The host deleted the stream.
    pub fn remove(&mut self, id: u32) -> Option<T> {
        self.by_id.remove(&id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_stream_keeps_its_value_through_a_burst_of_others() {
        // 5 000 streams waiting for their response at once (the old table was cleared at 4 096, dropping
        // every pending set-cookie), while 100 000 short streams come and go.
        let mut streams = Streams::default();
        for id in 0..5_000u32 {
            assert_eq!(streams.insert(id, format!("cookie-{id}")), None);
        }
        for id in 5_000..105_000u32 {
            assert_eq!(streams.insert(id, String::new()), None);
            assert!(streams.remove(id).is_some());
        }
        for id in 0..5_000u32 {
            assert_eq!(
                streams.remove(id).as_deref(),
                Some(format!("cookie-{id}").as_str())
            );
        }
        assert!(streams.is_empty());
    }

    #[test]
    fn a_pending_root_is_taken_once_and_bounded_without_wholesale_clears() {
        let mut pending = Pending::default();
        for stream in 0..5_000u32 {
            assert_eq!(pending.insert(stream, stream % 3), None);
        }
        for stream in (0..5_000u32).rev() {
            assert_eq!(pending.take(stream), Some(stream % 3));
        }
        assert!(pending.is_empty());
        assert_eq!(pending.take(7), None);
        let mut small = Pending::with_limit(2);
        assert_eq!(small.insert(1, 10), None);
        assert_eq!(small.insert(2, 10), None);
        assert_eq!(small.insert(3, 11), Some(1));
        assert_eq!(
            (small.take(2), small.take(3), small.len()),
            (Some(10), Some(11), 0)
        );
    }

    #[test]
    fn past_the_bound_only_the_oldest_stream_is_dropped() {
        let mut streams = Streams::with_limit(3);
        for id in [10, 11, 12] {
            assert_eq!(streams.insert(id, id), None);
        }
        assert_eq!(streams.insert(13, 13), Some(10));
        assert_eq!(streams.len(), 3);
        assert_eq!(streams.get(10), None);
        assert_eq!(streams.get(11), Some(&11));
        *streams.get_mut(13).unwrap() = 99;
        assert_eq!(streams.remove(13), Some(99));
        assert_eq!(streams.remove(13), None, "a stream is deleted once");
    }
}
