//! The evidence the Envoys' streams bring (load reports, stats flushes, access logs), as the intake of each
//! stream hands it over: kept per Envoy until the judge's next tick takes it.

use super::*;

impl Server {
    /// Adds one Envoy's load report for a cluster (completed requests, of which errors).
    pub fn report_load(&self, node: &str, cluster: &str, requests: u64, errors: u64) {
        {
            let mut load = lock(&self.load);
            load.entry((node.to_string(), cluster.to_string()))
                .or_default()
                .sum(&Load { requests, errors });
        }
        if self.streaming(node, StreamKind::Stats) {
            let mut paired = lock(&self.load_paired);
            let entry = paired
                .entry((node.to_string(), cluster.to_string()))
                .or_default();
            *entry = entry.saturating_add(requests);
        }
    }

    /// A load or stats stream of `node` opened (its node named).
    pub fn stream_opened(&self, node: &str, kind: StreamKind) {
        let mut streams = lock(&self.streams);
        let open = streams.entry(node.to_string()).or_default();
        if let Some(n) = open.get_mut(kind as usize) {
            *n = n.saturating_add(1);
        }
    }

    /// A load or stats stream of `node` ended.
    pub fn stream_closed(&self, node: &str, kind: StreamKind) {
        if kind == StreamKind::Load {
            // No report will come to pair them with.
            lock(&self.routed_held).remove(node);
        }
        let mut streams = lock(&self.streams);
        if let Some(open) = streams.get_mut(node) {
            if let Some(n) = open.get_mut(kind as usize) {
                *n = n.saturating_sub(1);
            }
            if open.iter().all(|n| *n == 0) {
                streams.remove(node);
            }
        }
    }

    /// A load report arrived from `node`, asked of it every `every` seconds: its evidence is in, and so are
    /// the requests its filter routed since its previous report (held until now, so that what the canary's
    /// hosts got and what the filter sent them cover the same time, at any pace).
    pub fn load_reported(&self, node: &str, every: u64) {
        {
            let mut last = lock(&self.last_reports);
            let seen = last.entry(node.to_string()).or_default();
            seen.load = now_unix();
            seen.load_every = every;
        }
        let held = lock(&self.routed_held).remove(node);
        if let Some(held) = held {
            let mut routed = lock(&self.routed);
            for ((rollout, version), requests) in held {
                let entry = routed
                    .entry((node.to_string(), rollout, version))
                    .or_default();
                *entry = entry.saturating_add(requests);
            }
        }
    }

    /// `node` was asked for its load reports at a new pace: it is waited for over `every` seconds until its
    /// next report.
    pub fn load_pace_asked(&self, node: &str, every: u64) {
        lock(&self.last_reports)
            .entry(node.to_string())
            .or_default()
            .load_every = every;
    }

    /// A stats flush arrived from `node`.
    pub fn stats_reported(&self, node: &str) {
        lock(&self.last_reports)
            .entry(node.to_string())
            .or_default()
            .flushed(now_unix());
    }

    /// The load streams open on this replica.
    pub fn load_streams(&self) -> usize {
        lock(&self.streams)
            .values()
            .filter(|open| open.get(StreamKind::Load as usize).is_some_and(|n| *n > 0))
            .count()
    }

    /// Sets the pace of the load reports for the load streams open now (`serve --load-report-interval`), each
    /// second: every open stream is asked for the new one when it changes.
    pub async fn pace_load_reports(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let streams = self.load_streams();
            let current = *self.load_every.borrow();
            let wanted = self.load_interval.seconds(streams, current);
            if wanted != current {
                eprintln!(
                    "canaryctl: load reports asked every {wanted}s instead of {current}s ({streams} Envoys stream their load to this replica)"
                );
                self.load_every.send_replace(wanted);
            }
        }
    }

    /// True while `node` has a stream of that kind open.
    fn streaming(&self, node: &str, kind: StreamKind) -> bool {
        lock(&self.streams)
            .get(node)
            .and_then(|open| open.get(kind as usize))
            .is_some_and(|n| *n > 0)
    }

    /// One Envoy's current host gauges for a cluster.
    pub fn report_hosts(&self, node: &str, cluster: &str, healthy: u64, total: u64) {
        lock(&self.hosts).insert(
            (node.to_string(), cluster.to_string()),
            (Hosts { healthy, total }, now_unix()),
        );
    }

    /// The hosts of `cluster` as each Envoy that streamed its stats in the last [`HOSTS_FRESH_S`] (or two of
    /// its flush intervals, when they are longer) sees them.
    pub(super) fn fresh_hosts(&self, cluster: &str, fleet: &BTreeSet<String>) -> Vec<Hosts> {
        let now = now_unix();
        let mut hosts = lock(&self.hosts);
        {
            let paces = lock(&self.last_reports);
            hosts.retain(|(node, _), (_, at)| {
                let every = paces.get(node).map_or(1, |r| r.stats_every);
                now.saturating_sub(*at) <= HOSTS_FRESH_S.max(every.saturating_mul(2))
            });
        }
        hosts
            .iter()
            .filter(|((node, c), _)| c == cluster && fleet.contains(node))
            .map(|(_, (h, _))| *h)
            .collect()
    }

    /// Requests the filter of one Envoy sent to a rollout's version since its previous flush. Counted only
    /// for an Envoy that also streams its load, so that what the canary's hosts got can be held against it,
    /// and held until that Envoy's next load report.
    pub fn report_routed(&self, node: &str, rollout: &str, version: &str, requests: u64) {
        if !self.streaming(node, StreamKind::Load) {
            return;
        }
        let mut held = lock(&self.routed_held);
        let entry = held
            .entry(node.to_string())
            .or_default()
            .entry((rollout.to_string(), version.to_string()))
            .or_default();
        *entry = entry.saturating_add(requests);
    }

    /// Adds one failure (an access-log entry or an application's log line) for the next tick; each rollout
    /// sorts it to stable or the canary by its owner.
    pub fn report_failure(&self, owner: Owner, signature: Signature, seen: String) {
        // Names beyond the filter's bound are no version or cluster of a rollout: bytes, not keys, bound memory.
        let name_bytes = match &owner {
            Owner::Cluster { node, cluster } => cluster.len().max(node.len()),
            Owner::Version { rollout, version } => {
                version.len().max(rollout.as_deref().map_or(0, str::len))
            }
        };
        if name_bytes > MAX_OWNER_BYTES {
            Metrics::bump(&self.metrics.failures_dropped);
            return;
        }
        let seen = crate::findings::example(&seen);
        let mut failures = lock(&self.failures);
        let key = (owner, signature);
        if !failures.contains_key(&key) && failures.len() >= MAX_FAILURE_KEYS {
            Metrics::bump(&self.metrics.failures_dropped);
            return;
        }
        let entry = failures.entry(key).or_default();
        entry.count = entry.count.saturating_add(1);
        if entry.example.is_empty() {
            entry.example = seen;
        }
    }

    /// Adds one Envoy's latency since its previous stats flush, for a cluster.
    pub fn report_latency(&self, node: &str, cluster: &str, histogram: &Histogram) {
        if histogram.count == 0 {
            return;
        }
        lock(&self.latency)
            .entry((node.to_string(), cluster.to_string()))
            .or_default()
            .add(histogram);
        let Some(fleet_cluster) = self.cluster_of(node) else {
            return;
        };
        let now = now_unix();
        let mut recent = lock(&self.recent_latency);
        let key = (fleet_cluster, cluster.to_string());
        if !recent.contains_key(&key) {
            // A new pair of clusters: windows gone quiet go.
            recent.retain(|_, w| {
                w.back()
                    .is_some_and(|(at, _)| now.saturating_sub(*at) <= LATENCY_WINDOW_S)
            });
        }
        let window = recent.entry(key).or_default();
        match window.back_mut() {
            Some((at, sum)) if *at == now => sum.add(histogram),
            _ => window.push_back((now, histogram.clone())),
        }
        while window
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > LATENCY_WINDOW_S)
        {
            window.pop_front();
        }
    }

    /// True when an Envoy streamed its stats within the last minute: latency can be compared.
    pub fn streams_stats(&self) -> bool {
        let last = Metrics::get(&self.metrics.last_stats_unix);
        last > 0 && now_unix().saturating_sub(last) <= 60
    }

    /// A cluster's latency over the last [`LATENCY_WINDOW_S`] seconds as the Envoys of `fleet_clusters` saw it;
    /// None when none of them streamed any.
    pub fn recent_latency(&self, cluster: &str, fleet_clusters: &[String]) -> Option<Histogram> {
        let now = now_unix();
        let recent = lock(&self.recent_latency);
        let mut sum = Histogram::default();
        for ((fleet_cluster, c), window) in recent.iter() {
            if c != cluster || !fleet_clusters.contains(fleet_cluster) {
                continue;
            }
            for (at, h) in window {
                if now.saturating_sub(*at) <= LATENCY_WINDOW_S {
                    sum.add(h);
                }
            }
        }
        (sum.count > 0).then_some(sum)
    }
}
