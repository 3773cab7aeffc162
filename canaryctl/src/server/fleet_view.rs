//! The fleet as this replica sees it: its own Envoys' streams (connected, named, what each applied or refused),
//! the other replicas' published fleets merged in, and the fleet kept in the store.

use super::*;

impl Server {
    /// Keeps the stored fleet current: saves it when it changed, forgets Envoys gone too long, and
    /// refreshes the connected Envoys' last-seen time once a minute. Runs until the process ends.
    pub async fn keep_fleet(self: Arc<Self>) {
        // Shared with other replicas, what an Envoy applied is published within a fifth of a second: a write on
        // another replica waits for it.
        let per_second = if self.store.shared() { 5 } else { 1 };
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
        let mut ticks = 0u64;
        loop {
            tick.tick().await;
            ticks += 1;
            // Links change with time alone (reconnecting → disconnected after the grace).
            self.fleet_moved();
            let now = now_unix();
            let second = ticks % u64::from(per_second) == 0;
            let seconds = ticks / u64::from(per_second);
            let save = {
                let mut fleet = self.fleet();
                for node in fleet.forget(&self.fleet_settings, now) {
                    eprintln!(
                        "canaryctl: forgot Envoy {} (not seen for over {})",
                        canary_router::text::quote(&node),
                        humantime::format_duration(self.fleet_settings.forget_after)
                    );
                }
                let refresh = second && seconds % 60 == 0 && fleet.any_connected();
                fleet.take_dirty() || refresh
            };
            // A state that could not be saved is retried each second, whatever else happened.
            if second && self.unsaved().is_some() {
                let _guard = self.write_lock.lock().await;
                let rollouts = self.rollouts();
                // A failure is logged and shown by persist; another replica's newer state replaces this one's.
                if let Err(SaveError::Conflict) =
                    self.persist(&self.desired(), &rollouts, None).await
                {
                    let _ = self.catch_up_locked().await;
                }
            }
            if save {
                if let Err(err) = self.store.save_fleet(&self.own_envoys()).await {
                    Metrics::bump(&self.metrics.save_failures);
                    if let Some(line) = lock(&self.durability).failed(now, &err.to_string()) {
                        eprintln!("canaryctl: {line}");
                    }
                }
            }
            // Shared with other replicas, a hold on a fleet ahead of this replica's state may only be this replica
            // being behind the store: read it.
            if second && self.store.shared() && self.holding() {
                let _guard = self.write_lock.lock().await;
                let _ = self.catch_up_locked().await;
                let version = self.desired().version;
                let mut ahead = lock(&self.ahead);
                if ahead.as_ref().is_some_and(|a| a.fleet_version <= version) {
                    *ahead = None;
                    eprintln!(
                        "canaryctl: hold ended: the store holds version {version}, what the fleet serves"
                    );
                }
            }
        }
    }

    // -- the fleet ---------------------------------------------------------------------------------

    pub(super) fn fleet(&self) -> MutexGuard<'_, Fleet> {
        lock(&self.fleet)
    }

    /// The fleet as every replica sees it (this replica's Envoys and those the others published).
    pub fn envoys(&self) -> Vec<EnvoyStatus> {
        let now = now_unix();
        let local = self.own_envoys();
        let remote = lock(&self.remote);
        if remote.fleets.is_empty() {
            return local;
        }
        let others = remote.fleets.iter().map(|((replica, _), doc)| {
            let gone = (!remote.live.contains(replica)).then(|| {
                remote
                    .gone_since
                    .get(replica)
                    .copied()
                    .unwrap_or(doc.at_unix)
            });
            (doc, gone)
        });
        crate::fleet::merged(local, others, &self.fleet_settings, now)
    }

    /// This replica's own Envoys, as it publishes them (named as its own when it has a name).
    pub(super) fn own_envoys(&self) -> Vec<EnvoyStatus> {
        let mut envoys = self.fleet().status(&self.fleet_settings, now_unix());
        let name = self.leadership.name();
        if !name.is_empty() {
            for envoy in &mut envoys {
                envoy.replica = Some(name.to_string());
            }
        }
        envoys
    }

    pub fn connect(&self, peer: Option<SocketAddr>) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let peer = peer.map(|p| p.to_string()).unwrap_or_default();
        self.fleet().open_stream(id, peer);
        id
    }

    pub fn identify(&self, stream: u64, node_id: &str, cluster: &str, certificate: Option<&str>) {
        self.fleet()
            .identify(stream, node_id, cluster, certificate, now_unix());
        self.fleet_moved();
    }

    /// A peer refused on the xDS port: counted, shown in the fleet view, and logged (once a minute for one
    /// that keeps retrying).
    pub fn refuse(
        &self,
        peer: Option<SocketAddr>,
        reason: Refused,
        message: String,
        node_id: Option<&str>,
    ) {
        let ip = peer.map(|p| p.ip().to_string()).unwrap_or_default();
        // It may quote what the peer sent: one bounded line.
        let message = canary_router::text::one_line(&message, canary_router::text::MAX_LINE);
        let log = {
            lock(&self.refused).record(
                ip,
                reason.label(),
                message.clone(),
                node_id.map(cut),
                now_unix(),
            )
        };
        if log {
            let from = peer.map(|p| p.to_string()).unwrap_or_default();
            eprintln!(
                "canaryctl: xDS: refused {from} ({}): {message}",
                reason.label()
            );
        }
    }

    /// The cluster the fleet knows `node_id` under, if it knows it.
    pub fn cluster_of(&self, node_id: &str) -> Option<String> {
        self.fleet().cluster_of(node_id).map(str::to_string)
    }

    /// Whether a report (`what`: "a load report") of `node` as a node of `cluster` counts: only while that node
    /// holds an ADS stream under the same node id and cluster. A refused one is counted and listed with the
    /// refused peers once its node has reported without an ADS stream for [`REPORT_GRACE`]: Envoy opens its
    /// streams in any order, and its first reports may come before its ADS stream names it (those are not
    /// evidence either).
    pub fn admit_report(
        &self,
        peer: Option<SocketAddr>,
        node: &str,
        cluster: &str,
        what: &str,
    ) -> bool {
        self.admit_report_at(peer, node, cluster, what, now_unix())
    }

    pub(super) fn admit_report_at(
        &self,
        peer: Option<SocketAddr>,
        node: &str,
        cluster: &str,
        what: &str,
        now: u64,
    ) -> bool {
        let subscribed = self.fleet().subscribed(node, cluster);
        {
            let mut waiting = lock(&self.unsubscribed_since);
            if subscribed {
                waiting.remove(node);
                return true;
            }
            // Node ids are the peer's word: beyond this many waiting at once, none gets the grace.
            if waiting.len() < MAX_WAITING_NODES || waiting.contains_key(node) {
                let since = *waiting.entry(node.to_string()).or_insert(now);
                if now.saturating_sub(since) < REPORT_GRACE.as_secs() {
                    return false;
                }
            }
        }
        Metrics::bump(&self.metrics.reports_unsubscribed);
        self.refuse(
            peer,
            Refused::NoAdsSubscription,
            format!(
                "{what} from node {} of cluster {}: no ADS stream holds that node and cluster, so it is not \
                 evidence",
                canary_router::text::quote(&cut(node)),
                canary_router::text::quote(&cut(cluster))
            ),
            Some(node),
        );
        false
    }

    pub fn refused_peers(&self) -> Vec<RefusedPeer> {
        lock(&self.refused).list()
    }

    pub fn refused_total(&self, reason: Refused) -> u64 {
        lock(&self.refused).total(reason.label())
    }

    pub fn sent(&self, stream: u64, version: u64) {
        Metrics::bump(&self.metrics.pushes);
        self.fleet().sent(stream, version);
    }

    pub fn acked(&self, stream: u64, version: u64) {
        Metrics::bump(&self.metrics.acks);
        self.fleet().acked(stream, version, now_unix());
        self.fleet_moved();
    }

    pub fn nacked(&self, stream: u64, version: u64, message: String) {
        Metrics::bump(&self.metrics.nacks);
        self.fleet().nacked(stream, version, message, now_unix());
        self.fleet_moved();
    }

    pub fn disconnect(&self, stream: u64) {
        self.fleet().close_stream(stream, now_unix());
        self.fleet_moved();
    }

    pub(super) fn fleet_moved(&self) {
        self.fleet_moves.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees the fleet view move (see the field).
    pub fn fleet_moves(&self) -> watch::Receiver<u64> {
        self.fleet_moves.subscribe()
    }
}
