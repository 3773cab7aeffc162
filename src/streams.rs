//! Per-stream state kept by the wasm glue between callbacks (a stream's config root, its pending
//! `set-cookie`), from the host's context create to its delete. Plain Rust, so its bounds are tested on
//! the host.
//!
//! Entries leave when the host deletes the stream. The bound only matters with a host that never does:
//! past [`MAX_STREAMS`] live entries, the oldest one (the lowest id: hosts number contexts upwards) is
//! dropped, one at a time. Nothing is ever cleared wholesale, so no pending value of a live stream is lost
//! to a burst of other streams.

use std::collections::BTreeMap;

/// Streams tracked at once, per VM (one per Envoy worker).
pub const MAX_STREAMS: usize = 1 << 16;

/// Values by stream context id, oldest first.
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
