//! The fleet: every Envoy canaryctl has seen, by node id, and what each applied. Plain data and rules, no
//! tokio or gRPC types, so that "did this change reach the fleet?" is answered by tested code.
//!
//! - An Envoy is remembered from its first xDS request until it has been gone for `forget_after`; what is
//!   remembered is saved in the state file, so a restarted canaryctl still knows who is missing.
//! - The fleet a write must reach is every Envoy seen within `window`, connected or not.
//! - An Envoy whose stream closed less than `reconnect_grace` ago (or that canaryctl has not seen since it
//!   started) is reconnecting: a write waits for it. After that it is disconnected, and a write reports it
//!   by name instead of claiming success.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which Envoys writes wait for, how long a dropped one may take to come back, and when a gone one is
/// forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSettings {
    pub window: Duration,
    pub forget_after: Duration,
    /// How long an Envoy may take to come back before a write calls it disconnected. Envoy retries a
    /// dropped ADS stream within a second or two; a canaryctl restart is covered by counting from its start.
    pub reconnect_grace: Duration,
}

/// What the state file keeps of an Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownEnvoy {
    pub node_id: String,
    pub cluster: String,
    pub first_seen_unix: u64,
    pub last_seen_unix: u64,
    pub acked_version: Option<u64>,
}

/// An Envoy's refusal of a version, with Envoy's reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    pub version: u64,
    pub message: String,
    pub at_unix: u64,
}

/// Where an Envoy's xDS stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Connected,
    /// Its stream closed less than `reconnect_grace` ago, or canaryctl has not seen it since starting.
    Reconnecting,
    /// Gone for longer than that, but seen within the fleet window: writes report it.
    Disconnected,
    /// Not seen within the fleet window: writes no longer wait for it (forgotten after `forget_after`).
    Gone,
}

/// One Envoy as `GET /v1/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvoyStatus {
    pub node_id: String,
    pub cluster: String,
    /// The address of its open (or last) stream.
    pub peer: String,
    pub link: Link,
    /// Open xDS streams with this node id: more than one means two Envoys share an id.
    pub streams: u32,
    pub first_seen_unix: u64,
    /// Now, while connected.
    pub last_seen_unix: u64,
    /// When its stream closed (or canaryctl started), while not connected.
    pub disconnected_since_unix: Option<u64>,
    /// Writes wait for it: seen within the fleet window.
    pub in_fleet: bool,
    pub sent_version: Option<u64>,
    pub acked_version: Option<u64>,
    /// Its refusal of the latest version it was sent, if it refused it.
    pub nack: Option<Nack>,
    /// With mTLS: the URI SAN of its client certificate that allows this node id.
    pub certificate: Option<String>,
    /// With replicas: the one it is (or was last) connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    cluster: String,
    peer: String,
    streams: u32,
    first_seen_unix: u64,
    last_seen_unix: u64,
    /// Set while no stream is open.
    disconnected_since_unix: Option<u64>,
    sent_version: Option<u64>,
    acked_version: Option<u64>,
    nack: Option<Nack>,
    certificate: Option<String>,
}

/// Every Envoy seen and every open stream; all times are passed in (unix seconds).
#[derive(Debug, Default)]
pub struct Fleet {
    envoys: BTreeMap<String, Entry>,
    /// Open streams: their node id once their first request named it, and their peer.
    streams: HashMap<u64, (Option<String>, String)>,
    /// Something worth saving changed since the last [`Fleet::take_dirty`].
    dirty: bool,
}

impl Fleet {
    /// The fleet a restarted canaryctl starts from: every saved Envoy, not connected since `now`.
    pub fn restore(known: Vec<KnownEnvoy>, now: u64) -> Self {
        let envoys = known
            .into_iter()
            .map(|k| {
                let entry = Entry {
                    cluster: k.cluster,
                    peer: String::new(),
                    streams: 0,
                    first_seen_unix: k.first_seen_unix,
                    last_seen_unix: k.last_seen_unix,
                    disconnected_since_unix: Some(now),
                    sent_version: None,
                    acked_version: k.acked_version,
                    nack: None,
                    certificate: None,
                };
                (k.node_id, entry)
            })
            .collect();
        Self {
            envoys,
            streams: HashMap::new(),
            dirty: false,
        }
    }

    /// What the state file keeps; `now` is the last-seen time of the connected ones.
    pub fn known(&self, now: u64) -> Vec<KnownEnvoy> {
        self.envoys
            .iter()
            .map(|(node_id, e)| KnownEnvoy {
                node_id: node_id.clone(),
                cluster: e.cluster.clone(),
                first_seen_unix: e.first_seen_unix,
                last_seen_unix: if e.streams > 0 { now } else { e.last_seen_unix },
                acked_version: e.acked_version,
            })
            .collect()
    }

    /// True (once) when something changed that the state file should keep.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Whether `node_id` holds an ADS stream as a node of `cluster` (a report must come from such a node).
    pub fn subscribed(&self, node_id: &str, cluster: &str) -> bool {
        self.envoys
            .get(node_id)
            .is_some_and(|e| e.streams > 0 && e.cluster == cluster)
    }

    /// The cluster the fleet knows `node_id` under, if it knows it.
    pub fn cluster_of(&self, node_id: &str) -> Option<&str> {
        self.envoys
            .get(node_id)
            .map(|e| e.cluster.as_str())
            .filter(|c| !c.is_empty())
    }

    /// True when some Envoy is connected (its last-seen time moves with the clock).
    pub fn any_connected(&self) -> bool {
        self.envoys.values().any(|e| e.streams > 0)
    }

    pub fn open_stream(&mut self, stream: u64, peer: String) {
        self.streams.insert(stream, (None, peer));
    }

    /// The stream's node, from its first request; a stream never changes node. `certificate`: the URI SAN
    /// that allowed it, with mTLS.
    pub fn identify(
        &mut self,
        stream: u64,
        node_id: &str,
        cluster: &str,
        certificate: Option<&str>,
        now: u64,
    ) {
        let Some((node, peer)) = self.streams.get_mut(&stream) else {
            return;
        };
        if node.is_some() {
            return;
        }
        *node = Some(node_id.to_string());
        let peer = peer.clone();
        let entry = self
            .envoys
            .entry(node_id.to_string())
            .or_insert_with(|| Entry {
                cluster: String::new(),
                peer: String::new(),
                streams: 0,
                first_seen_unix: now,
                last_seen_unix: now,
                disconnected_since_unix: None,
                sent_version: None,
                acked_version: None,
                nack: None,
                certificate: None,
            });
        entry.cluster = cluster.to_string();
        entry.certificate = certificate.map(str::to_string);
        entry.peer = peer;
        entry.streams += 1;
        entry.last_seen_unix = now;
        entry.disconnected_since_unix = None;
        self.dirty = true;
    }

    fn entry_of(&mut self, stream: u64) -> Option<&mut Entry> {
        let node = self.streams.get(&stream)?.0.as_ref()?;
        self.envoys.get_mut(node)
    }

    pub fn sent(&mut self, stream: u64, version: u64) {
        if let Some(entry) = self.entry_of(stream) {
            entry.sent_version = Some(version);
        }
    }

    pub fn acked(&mut self, stream: u64, version: u64, now: u64) {
        if let Some(entry) = self.entry_of(stream) {
            entry.acked_version = Some(version);
            entry.nack = None;
            entry.last_seen_unix = now;
            self.dirty = true;
        }
    }

    pub fn nacked(&mut self, stream: u64, version: u64, message: String, now: u64) {
        if let Some(entry) = self.entry_of(stream) {
            entry.nack = Some(Nack {
                version,
                message,
                at_unix: now,
            });
            entry.last_seen_unix = now;
            // Other replicas show it too.
            self.dirty = true;
        }
    }

    pub fn close_stream(&mut self, stream: u64, now: u64) {
        let Some((Some(node), _)) = self.streams.remove(&stream) else {
            return;
        };
        if let Some(entry) = self.envoys.get_mut(&node) {
            entry.streams = entry.streams.saturating_sub(1);
            entry.last_seen_unix = now;
            if entry.streams == 0 {
                entry.disconnected_since_unix = Some(now);
            }
            self.dirty = true;
        }
    }

    /// Drops the Envoys not seen for `forget_after`; returns their node ids.
    pub fn forget(&mut self, settings: &FleetSettings, now: u64) -> Vec<String> {
        let limit = settings.forget_after.as_secs();
        let gone: Vec<String> = self
            .envoys
            .iter()
            .filter(|(_, e)| e.streams == 0 && now.saturating_sub(e.last_seen_unix) > limit)
            .map(|(node, _)| node.clone())
            .collect();
        for node in &gone {
            self.envoys.remove(node);
        }
        if !gone.is_empty() {
            self.dirty = true;
        }
        gone
    }

    /// Every remembered Envoy as the status shows it, by node id.
    pub fn status(&self, settings: &FleetSettings, now: u64) -> Vec<EnvoyStatus> {
        self.envoys
            .iter()
            .map(|(node_id, e)| {
                let connected = e.streams > 0;
                let last_seen_unix = if connected { now } else { e.last_seen_unix };
                let in_fleet = now.saturating_sub(last_seen_unix) <= settings.window.as_secs();
                let since = e.disconnected_since_unix.unwrap_or(last_seen_unix);
                let link = if connected {
                    Link::Connected
                } else if !in_fleet {
                    Link::Gone
                } else if now.saturating_sub(since) < settings.reconnect_grace.as_secs() {
                    Link::Reconnecting
                } else {
                    Link::Disconnected
                };
                EnvoyStatus {
                    node_id: node_id.clone(),
                    cluster: e.cluster.clone(),
                    peer: e.peer.clone(),
                    link,
                    streams: e.streams,
                    first_seen_unix: e.first_seen_unix,
                    last_seen_unix,
                    disconnected_since_unix: (!connected).then_some(since),
                    in_fleet,
                    sent_version: e.sent_version,
                    acked_version: e.acked_version,
                    nack: e.nack.clone(),
                    certificate: e.certificate.clone(),
                    replica: None,
                }
            })
            .collect()
    }
}

/// How far a version has got through the fleet (only Envoys in the fleet window count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress<'a> {
    pub applied: Vec<&'a EnvoyStatus>,
    /// Refused it (a NACK of this version): it keeps serving an older one.
    pub refused: Vec<&'a EnvoyStatus>,
    /// Connected or reconnecting, and not there yet.
    pub waiting: Vec<&'a EnvoyStatus>,
    /// Gone longer than the grace: it gets the version when it reconnects.
    pub disconnected: Vec<&'a EnvoyStatus>,
}

impl<'a> Progress<'a> {
    pub fn of(envoys: &'a [EnvoyStatus], version: u64) -> Self {
        let mut progress = Progress::default();
        for envoy in envoys.iter().filter(|e| e.in_fleet) {
            let list = if envoy.acked_version.is_some_and(|v| v >= version) {
                &mut progress.applied
            } else if envoy.nack.as_ref().is_some_and(|n| n.version == version) {
                &mut progress.refused
            } else {
                match envoy.link {
                    Link::Connected | Link::Reconnecting => &mut progress.waiting,
                    Link::Disconnected | Link::Gone => &mut progress.disconnected,
                }
            };
            list.push(envoy);
        }
        progress
    }

    pub fn fleet_size(&self) -> usize {
        self.applied.len() + self.refused.len() + self.waiting.len() + self.disconnected.len()
    }
}

/// How many waiting Envoys a write's progress names (the rest are counted).
pub const NAMED_WAITING: usize = 20;

/// `GET /v1/progress`: how far the fleet is in applying one version, as a write's wait reads it. Counts, the
/// Envoys that refused it or are gone (each is named in the answer to the operator), and the first waiting ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressView {
    pub version: u64,
    /// The fleet view's generation this was read at: the next long poll waits for another.
    pub generation: u64,
    pub fleet: usize,
    pub applied: usize,
    pub refused: Vec<EnvoyStatus>,
    pub waiting: usize,
    /// The first [`NAMED_WAITING`] waiting Envoys' node ids.
    pub waiting_nodes: Vec<String>,
    pub disconnected: Vec<EnvoyStatus>,
}

impl ProgressView {
    pub fn of(progress: &Progress, version: u64, generation: u64) -> Self {
        let owned = |list: &[&EnvoyStatus]| list.iter().map(|e| (*e).clone()).collect();
        Self {
            version,
            generation,
            fleet: progress.fleet_size(),
            applied: progress.applied.len(),
            refused: owned(&progress.refused),
            waiting: progress.waiting.len(),
            waiting_nodes: progress
                .waiting
                .iter()
                .take(NAMED_WAITING)
                .map(|e| e.node_id.clone())
                .collect(),
            disconnected: owned(&progress.disconnected),
        }
    }

    /// Nothing left to wait for.
    pub fn settled(&self) -> bool {
        self.waiting == 0
    }

    /// The waiting Envoys as a line: the first ones named, the rest counted.
    pub fn waiting_line(&self) -> String {
        let mut line = self.waiting_nodes.join(", ");
        let more = self.waiting.saturating_sub(self.waiting_nodes.len());
        if more > 0 {
            line.push_str(&format!(" and {more} more"));
        }
        line
    }
}

/// A peer refused on the xDS port (TLS handshake or node identity), as the fleet view shows it: one entry per
/// address, reason and claimed node id, however often it retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedPeer {
    /// Its IP address (each retry comes from a new port).
    pub peer: String,
    /// The label of `canaryctl_xds_refused_total`.
    pub reason: String,
    /// The latest refusal, in words.
    pub message: String,
    /// The node id it claimed, when it got as far as naming one.
    pub node_id: Option<String>,
    pub count: u64,
    pub first_unix: u64,
    pub last_unix: u64,
    /// When it was last written to the log.
    #[serde(skip)]
    logged_unix: u64,
}

/// Recent refusals, bounded so that a scan of the port cannot grow memory, and the totals per reason.
#[derive(Debug, Default)]
pub struct RefusedPeers {
    entries: Vec<RefusedPeer>,
    totals: BTreeMap<&'static str, u64>,
}

impl RefusedPeers {
    /// At most this many distinct refusals are kept (the oldest goes first).
    pub const LIMIT: usize = 64;
    /// A refusal that repeats is logged again after this many seconds.
    pub const LOG_EVERY_S: u64 = 60;

    /// Counts a refusal; true when it should be logged (new, or not logged for a minute).
    pub fn record(
        &mut self,
        peer: String,
        reason: &'static str,
        message: String,
        node_id: Option<String>,
        now: u64,
    ) -> bool {
        *self.totals.entry(reason).or_default() += 1;
        if let Some(entry) = self
            .entries
            .iter_mut()
            .find(|e| e.peer == peer && e.reason == reason && e.node_id == node_id)
        {
            entry.count += 1;
            entry.last_unix = now;
            entry.message = message;
            let log = now.saturating_sub(entry.logged_unix) >= Self::LOG_EVERY_S;
            if log {
                entry.logged_unix = now;
            }
            return log;
        }
        if self.entries.len() >= Self::LIMIT {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_unix)
                .map(|(i, _)| i);
            if let Some(oldest) = oldest {
                self.entries.swap_remove(oldest);
            }
        }
        self.entries.push(RefusedPeer {
            peer,
            reason: reason.to_string(),
            message,
            node_id,
            count: 1,
            first_unix: now,
            last_unix: now,
            logged_unix: now,
        });
        true
    }

    /// The latest first.
    pub fn list(&self) -> Vec<RefusedPeer> {
        let mut list = self.entries.clone();
        list.sort_by(|a, b| {
            b.last_unix
                .cmp(&a.last_unix)
                .then_with(|| a.peer.cmp(&b.peer))
        });
        list
    }

    pub fn total(&self, reason: &str) -> u64 {
        self.totals.get(reason).copied().unwrap_or(0)
    }
}

/// In etcd a replica's fleet is this many documents (`fleets/<replica>/<shard>`), each Envoy in the one its
/// node id hashes to: one value for the whole fleet (about 320 bytes an Envoy) would pass etcd's request
/// limit (1.5 MiB by default) at about 4,500 Envoys, and each change would rewrite all of it.
pub const FLEET_SHARDS: u32 = 16;

/// The shard an Envoy's row is kept in (FNV-1a, stable across builds and replicas).
pub fn shard_of(node_id: &str) -> u32 {
    (canary_router::hash::fnv1a64(&[node_id.as_bytes()]) % u64::from(FLEET_SHARDS)) as u32
}

/// A replica's Envoys split into its [`FLEET_SHARDS`] documents (an empty one for a shard with none).
pub fn shards(envoys: &[EnvoyStatus], at_unix: u64) -> Vec<FleetDoc> {
    let mut docs: Vec<FleetDoc> = (0..FLEET_SHARDS)
        .map(|_| FleetDoc {
            at_unix,
            envoys: Vec::new(),
        })
        .collect();
    for envoy in envoys {
        if let Some(doc) = docs.get_mut(shard_of(&envoy.node_id) as usize) {
            doc.envoys.push(envoy.clone());
        }
    }
    docs
}

/// The replica and shard of a fleet document's key (`<replica>/<shard>` after `fleets/`; a replica's name may
/// hold a `/`, the shard never does).
pub fn shard_key(rest: &str) -> Option<(&str, u32)> {
    let (replica, shard) = rest.rsplit_once('/')?;
    let shard: u32 = shard.parse().ok()?;
    (!replica.is_empty() && shard < FLEET_SHARDS).then_some((replica, shard))
}

/// What another replica published of its Envoys, and whether it is alive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetDoc {
    /// When the replica wrote it (unix seconds).
    pub at_unix: u64,
    pub envoys: Vec<EnvoyStatus>,
}

impl KnownEnvoy {
    /// What a restarted replica remembers of an Envoy it published.
    pub fn of(status: &EnvoyStatus) -> Self {
        Self {
            node_id: status.node_id.clone(),
            cluster: status.cluster.clone(),
            first_seen_unix: status.first_seen_unix,
            last_seen_unix: status.last_seen_unix,
            acked_version: status.acked_version,
        }
    }
}

/// The fleet as every replica sees it: this replica's Envoys and the others' (`remote`: each replica's
/// document, and since when it is gone when its lease ended). One entry per node: a connected one wins
/// (open streams add up: two connected entries are two Envoys with one id), else the one seen last. An Envoy
/// a gone replica showed connected is reconnecting for `reconnect_grace` from when the replica went, then
/// disconnected.
pub fn merged<'a>(
    local: Vec<EnvoyStatus>,
    remote: impl IntoIterator<Item = (&'a FleetDoc, Option<u64>)>,
    settings: &FleetSettings,
    now: u64,
) -> Vec<EnvoyStatus> {
    let mut by_node: BTreeMap<String, EnvoyStatus> =
        local.into_iter().map(|e| (e.node_id.clone(), e)).collect();
    for (doc, gone_since) in remote {
        for envoy in &doc.envoys {
            let mut envoy = envoy.clone();
            if let (Some(since), Link::Connected) = (gone_since, envoy.link) {
                envoy.streams = 0;
                envoy.disconnected_since_unix = Some(since);
                envoy.link = if now.saturating_sub(since) < settings.reconnect_grace.as_secs() {
                    Link::Reconnecting
                } else {
                    Link::Disconnected
                };
            }
            match by_node.get_mut(&envoy.node_id) {
                None => {
                    by_node.insert(envoy.node_id.clone(), envoy);
                }
                Some(mine) => match (mine.link == Link::Connected, envoy.link == Link::Connected) {
                    (true, true) => mine.streams = mine.streams.saturating_add(envoy.streams),
                    (false, true) => *mine = envoy,
                    (false, false) if envoy.last_seen_unix > mine.last_seen_unix => *mine = envoy,
                    _ => {}
                },
            }
        }
    }
    by_node.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: FleetSettings = FleetSettings {
        window: Duration::from_secs(3600),
        forget_after: Duration::from_secs(7 * 24 * 3600),
        reconnect_grace: Duration::from_secs(10),
    };

    fn connect(fleet: &mut Fleet, stream: u64, node: &str, now: u64) {
        fleet.open_stream(stream, format!("127.0.0.1:{stream}"));
        fleet.identify(stream, node, "edge", None, now);
    }

    fn by_node<'a>(envoys: &'a [EnvoyStatus], node: &str) -> &'a EnvoyStatus {
        envoys.iter().find(|e| e.node_id == node).unwrap()
    }

    #[test]
    fn an_envoy_is_remembered_by_node_across_reconnects() {
        let mut fleet = Fleet::default();
        connect(&mut fleet, 1, "front-1", 100);
        fleet.sent(1, 3);
        fleet.acked(1, 3, 101);
        fleet.close_stream(1, 110);
        let status = fleet.status(&HOUR, 112);
        let e = by_node(&status, "front-1");
        assert_eq!(
            (e.link, e.streams, e.acked_version),
            (Link::Reconnecting, 0, Some(3))
        );
        assert_eq!(fleet.status(&HOUR, 121)[0].link, Link::Disconnected);
        connect(&mut fleet, 2, "front-1", 130);
        let status = fleet.status(&HOUR, 131);
        assert_eq!(status.len(), 1, "one entry per node, not per stream");
        assert_eq!(
            (status[0].link, status[0].first_seen_unix),
            (Link::Connected, 100)
        );
        assert_eq!(status[0].disconnected_since_unix, None);
    }

    #[test]
    fn a_write_counts_every_envoy_of_the_window_and_names_the_missing() {
        let mut fleet = Fleet::default();
        for (stream, node) in [(1, "a"), (2, "b"), (3, "c"), (5, "e")] {
            connect(&mut fleet, stream, node, 1_000);
        }
        connect(&mut fleet, 4, "d", 500);
        fleet.close_stream(4, 500); // d: last seen 4100 s before the write, outside the one-hour window
        fleet.close_stream(3, 4_000); // c: dropped 600 s before the write
        let now = 4_600;
        fleet.acked(1, 2, now);
        fleet.nacked(2, 2, "bad".into(), now);
        let status = fleet.status(&HOUR, now);
        let progress = Progress::of(&status, 2);
        let names =
            |list: &[&EnvoyStatus]| list.iter().map(|e| e.node_id.clone()).collect::<Vec<_>>();
        assert_eq!(names(&progress.applied), ["a"]);
        assert_eq!(names(&progress.refused), ["b"]);
        assert_eq!(names(&progress.waiting), ["e"]);
        assert_eq!(names(&progress.disconnected), ["c"]);
        assert_eq!(progress.fleet_size(), 4, "d is outside the window");
        let view = ProgressView::of(&progress, 2, 0);
        assert!(!view.settled());
        // A large wait names its first Envoys and counts the rest.
        let many = ProgressView {
            waiting: NAMED_WAITING + 5,
            waiting_nodes: (0..NAMED_WAITING).map(|i| format!("n{i}")).collect(),
            ..view
        };
        assert!(many.waiting_line().starts_with("n0, n1, "));
        assert!(many.waiting_line().ends_with("n19 and 5 more"));
        assert_eq!(by_node(&status, "d").link, Link::Gone);
        let later = fleet.status(&HOUR, 9_000);
        assert!(!by_node(&later, "c").in_fleet && by_node(&later, "c").link == Link::Gone);
    }

    #[test]
    fn a_restarted_canaryctl_waits_for_the_saved_fleet_to_come_back() {
        let mut fleet = Fleet::default();
        connect(&mut fleet, 1, "a", 100);
        fleet.acked(1, 7, 100);
        let saved = fleet.known(200);
        assert_eq!(
            saved[0].last_seen_unix, 200,
            "a connected Envoy was seen now"
        );
        let text = serde_json::to_string(&saved).unwrap();
        let restored = Fleet::restore(serde_json::from_str(&text).unwrap(), 300);
        let status = restored.status(&HOUR, 305);
        assert_eq!(
            (status[0].link, status[0].acked_version),
            (Link::Reconnecting, Some(7))
        );
        assert_eq!(Progress::of(&status, 8).waiting.len(), 1);
        let status = restored.status(&HOUR, 320);
        assert_eq!(Progress::of(&status, 8).disconnected.len(), 1);
        assert_eq!(Progress::of(&status, 7).applied.len(), 1);
        // Gone past the grace: nothing left to wait for, and the Envoy is named as disconnected.
        let view = ProgressView::of(&Progress::of(&status, 8), 8, 3);
        assert_eq!(
            (
                view.fleet,
                view.applied,
                view.waiting,
                view.disconnected.len()
            ),
            (1, 0, 0, 1)
        );
        assert!(view.settled() && view.waiting_line().is_empty());
    }

    #[test]
    fn envoys_gone_longer_than_forget_after_are_forgotten() {
        let settings = FleetSettings {
            window: Duration::from_secs(60),
            forget_after: Duration::from_secs(600),
            reconnect_grace: Duration::from_secs(10),
        };
        let mut fleet = Fleet::default();
        connect(&mut fleet, 1, "old", 0);
        connect(&mut fleet, 2, "live", 0);
        fleet.close_stream(1, 10);
        let _ = fleet.take_dirty();
        assert!(fleet.forget(&settings, 600).is_empty());
        assert_eq!(fleet.forget(&settings, 611), ["old"]);
        assert!(fleet.take_dirty());
        assert_eq!(
            fleet.status(&settings, 10_000).len(),
            1,
            "a connected Envoy is never forgotten"
        );
    }

    #[test]
    fn two_envoys_sharing_a_node_id_show_as_two_streams() {
        let mut fleet = Fleet::default();
        connect(&mut fleet, 1, "dup", 0);
        connect(&mut fleet, 2, "dup", 0);
        fleet.close_stream(1, 5);
        let status = fleet.status(&HOUR, 6);
        assert_eq!((status[0].link, status[0].streams), (Link::Connected, 1));
    }

    #[test]
    fn refusals_are_grouped_by_peer_reason_and_node_bounded_and_logged_once_a_minute() {
        let mut refused = RefusedPeers::default();
        let mismatch = || "node \"b\" is not named".to_string();
        assert!(refused.record(
            "10.0.0.1".into(),
            "identity_mismatch",
            mismatch(),
            Some("b".into()),
            100
        ));
        assert!(!refused.record(
            "10.0.0.1".into(),
            "identity_mismatch",
            mismatch(),
            Some("b".into()),
            110
        ));
        assert!(refused.record(
            "10.0.0.1".into(),
            "identity_mismatch",
            mismatch(),
            Some("b".into()),
            170
        ));
        assert!(refused.record(
            "10.0.0.1".into(),
            "unknown_ca",
            "other CA".into(),
            None,
            171
        ));
        let list = refused.list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].reason.as_str(), list[0].count), ("unknown_ca", 1));
        assert_eq!(
            (list[1].count, list[1].first_unix, list[1].last_unix),
            (3, 100, 170)
        );
        assert_eq!(refused.total("identity_mismatch"), 3);

        for i in 0..200u64 {
            refused.record(
                format!("10.1.0.{i}"),
                "not_tls",
                "plaintext".into(),
                None,
                200 + i,
            );
        }
        let list = refused.list();
        assert_eq!(list.len(), RefusedPeers::LIMIT);
        assert_eq!(list[0].peer, "10.1.0.199");
        assert_eq!(refused.total("not_tls"), 200);
        assert_eq!(
            refused.total("identity_mismatch"),
            3,
            "totals outlive the bounded list"
        );
    }

    fn seen(node: &str, link: Link, last_seen: u64, replica: &str) -> EnvoyStatus {
        EnvoyStatus {
            node_id: node.to_string(),
            cluster: "edge".to_string(),
            peer: String::new(),
            link,
            streams: u32::from(link == Link::Connected),
            first_seen_unix: 1,
            last_seen_unix: last_seen,
            disconnected_since_unix: (link != Link::Connected).then_some(last_seen),
            in_fleet: true,
            sent_version: Some(3),
            acked_version: Some(3),
            nack: None,
            certificate: None,
            replica: Some(replica.to_string()),
        }
    }

    #[test]
    fn a_replica_s_fleet_is_split_in_stable_shards_each_far_below_etcd_s_limit() {
        // Pinned: every replica (and every release) must put a node in the same shard (FNV-1a 64 of the node id,
        // modulo 16, computed by hand).
        let golden: Vec<u32> = ["front-1", "front-2", "edge-7", ""]
            .iter()
            .map(|n| shard_of(n))
            .collect();
        assert_eq!(golden, [10, 7, 12, 5]);
        // 10,000 Envoys with realistic rows: every Envoy in exactly one shard, each shard's document well under
        // etcd's 1.5 MiB (one document for all of them was about 3 MiB).
        let envoys: Vec<EnvoyStatus> = (0..10_000)
            .map(|i| {
                let name = format!("front-{i:05}.edge.example.internal");
                let mut e = seen(
                    &name,
                    Link::Connected,
                    1_796_000_000,
                    "canaryctl-0.canaryctl.svc:9902",
                );
                e.peer = "10.20.30.40:51234".to_string();
                e
            })
            .collect();
        let whole = serde_json::to_vec(&FleetDoc {
            at_unix: 1,
            envoys: envoys.clone(),
        })
        .unwrap();
        assert!(whole.len() > 1_572_864, "{}", whole.len());
        let docs = shards(&envoys, 7);
        assert_eq!(docs.len(), FLEET_SHARDS as usize);
        assert_eq!(
            docs.iter().map(|d| d.envoys.len()).sum::<usize>(),
            envoys.len()
        );
        for (shard, doc) in (0u32..).zip(&docs) {
            assert!(doc.envoys.iter().all(|e| shard_of(&e.node_id) == shard));
            let bytes = serde_json::to_vec(doc).unwrap().len();
            assert!(bytes < 400_000, "shard {shard}: {bytes} bytes");
        }
        // Keys: the replica's name may hold a slash; the shard is the last part, and one of ours.
        assert_eq!(shard_key("a/3"), Some(("a", 3)));
        assert_eq!(shard_key("ns/a/15"), Some(("ns/a", 15)));
        for bad in ["a", "a/16", "a/x", "/3", "a/-1"] {
            assert_eq!(shard_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_fleet_merged_over_replicas_shows_each_envoy_where_it_is_connected() {
        let settings = FleetSettings {
            window: Duration::from_secs(3600),
            forget_after: Duration::from_secs(7200),
            reconnect_grace: Duration::from_secs(10),
        };
        // front-1 moved from a to b; front-2 is on c, which died at 995; front-3 only a remembers.
        let local = vec![
            seen("front-1", Link::Disconnected, 900, "a"),
            seen("front-3", Link::Disconnected, 950, "a"),
        ];
        let b = FleetDoc {
            at_unix: 990,
            envoys: vec![seen("front-1", Link::Connected, 990, "b")],
        };
        let c = FleetDoc {
            at_unix: 980,
            envoys: vec![seen("front-2", Link::Connected, 980, "c")],
        };
        let view = merged(local, [(&b, None), (&c, Some(995))], &settings, 1000);
        let by = |node: &str| view.iter().find(|e| e.node_id == node).unwrap().clone();
        assert_eq!(view.len(), 3);
        assert_eq!(
            (by("front-1").link, by("front-1").replica.as_deref()),
            (Link::Connected, Some("b"))
        );
        assert_eq!(
            by("front-2").link,
            Link::Reconnecting,
            "c went 5 s ago: within the grace"
        );
        assert_eq!(by("front-2").streams, 0);
        assert_eq!(by("front-3").link, Link::Disconnected);
        let later = merged(Vec::new(), [(&c, Some(995))], &settings, 1006);
        assert_eq!(later[0].link, Link::Disconnected);
        // One node id connected on two replicas: two Envoys share it, and the streams say so.
        let twice = merged(
            vec![seen("front-1", Link::Connected, 1000, "a")],
            [(&b, None)],
            &settings,
            1000,
        );
        assert_eq!(twice[0].streams, 2);
    }
}
