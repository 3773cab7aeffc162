//! etcd as the store, through its v3 API. Under the prefix (default `/canaryctl/`):
//!
//! - `state`: the desired config, its version and the rollouts, as one JSON value (the state file's form,
//!   without the fleet). Every write is a transaction guarded by the `mod_revision` it was made from; a
//!   judge's write is also guarded by its leader key's `create_revision`.
//! - `fleets/<replica>/<shard>`: each replica's view of the Envoys it serves and has served, in
//!   [`crate::fleet::FLEET_SHARDS`] documents (an Envoy in the one its node id hashes to), written by that
//!   replica only (on connect, disconnect, and a change of what an Envoy applied; not per heartbeat), and only
//!   the documents that changed. `fleet/<replica>`, one document for the whole fleet, is what releases before
//!   the shards wrote: still read, and deleted by the replica's first sharded save.
//! - `leader`: the judge's key, held by a lease (see `crate::leader`).
//! - `replicas/<replica>`: each live replica, held by its lease.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};

use super::{Fence, Revision, SaveError};
use crate::fleet::{EnvoyStatus, FleetDoc, KnownEnvoy, Link};
use crate::rollout::Rollout;
use crate::state::{decode, encode, recovered, Desired, Saved, StateError};

/// Every request to etcd is answered within this, or fails (a replica never hangs on a lost quorum).
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// Whether a failed request may succeed on another member or a moment later.
fn transient(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    match err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => false,
    }
}

/// How to reach etcd: `serve --store etcd://h1:2379,h2:2379` and its TLS and auth flags.
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// PEM files: the CA that signed etcd's certificate, and this replica's client certificate and key.
    pub ca: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    /// etcd's auth: user name and password.
    pub user: Option<(String, String)>,
    /// This replica's name: its fleet key and its leader key's value.
    pub replica: String,
}

/// The `etcd://` store URL's endpoints: `etcd://h1:2379,h2:2379` → `["h1:2379", "h2:2379"]`. None when the
/// URL is not an etcd one.
pub fn endpoints_of(url: &str) -> Option<Result<Vec<String>, String>> {
    let rest = url.strip_prefix("etcd://")?;
    let endpoints: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .map(str::to_string)
        .collect();
    if let Some(bad) = endpoints
        .iter()
        .find(|e| e.is_empty() || e.contains('/') || !e.contains(':'))
    {
        return Some(Err(format!(
            "--store {}: endpoint {} is not host:port (give etcd://host:port,host:port)",
            canary_router::text::quote(url),
            canary_router::text::quote(bad)
        )));
    }
    Some(Ok(endpoints))
}

/// One etcd member, and canaryctl's client of it (made on first use: a member down at start is tried later).
struct Member {
    url: String,
    client: tokio::sync::OnceCell<Client>,
}

/// The store talks to one member at a time (pinned, as etcd's own clients do) and moves to the next when
/// that one fails: a member killed or cut off costs one failed attempt, never a failed write.
pub struct EtcdStore {
    members: Vec<Member>,
    pinned: std::sync::atomic::AtomicUsize,
    options: ConnectOptions,
    settings: EtcdSettings,
    /// Each fleet shard's Envoys as this replica last wrote them (a shard is written again only when they
    /// change).
    fleet_written: std::sync::Mutex<std::collections::BTreeMap<u32, Vec<EnvoyStatus>>>,
}

fn failed(what: &str, err: impl std::fmt::Display) -> StateError {
    StateError::Io(format!(
        "etcd: {what}: {}",
        canary_router::text::one_line(&err.to_string(), canary_router::text::MAX_LINE)
    ))
}

/// An etcd client error as an operator reads it: gRPC's code and message ("unavailable: etcdserver: no
/// leader", "unavailable: tcp connect error"), without the client library's debug chain.
pub fn brief(err: &etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            let code = format!("{:?}", status.code()).to_lowercase();
            format!("{code}: {}", status.message())
        }
        other => canary_router::text::one_line(&other.to_string(), 200),
    }
}

impl EtcdStore {
    /// Connects (lazily: an unreachable etcd is an error of the first request, not of the start).
    pub async fn connect(settings: EtcdSettings) -> Result<Self, StateError> {
        let read = |flag: &str, path: &str| {
            std::fs::read(path).map_err(|err| StateError::Io(format!("{flag} {path}: {err}")))
        };
        let mut options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), REQUEST_TIMEOUT)
            // Without a quorum a member answers "no leader" at once instead of letting requests hang.
            .with_require_leader(true);
        let scheme = if settings.ca.is_some() {
            let ca = read("--store-ca", settings.ca.as_deref().unwrap_or_default())?;
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            match (&settings.cert, &settings.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(etcd_client::Identity::from_pem(
                        read("--store-cert", cert)?,
                        read("--store-key", key)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(StateError::Io(
                        "--store-cert and --store-key go together".to_string(),
                    ))
                }
            }
            options = options.with_tls(tls);
            "https"
        } else {
            if settings.cert.is_some() || settings.key.is_some() {
                return Err(StateError::Io(
                    "--store-cert and --store-key need --store-ca (the CA of etcd's certificate)"
                        .to_string(),
                ));
            }
            "http"
        };
        if let Some((user, password)) = &settings.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let members = settings
            .endpoints
            .iter()
            .map(|e| Member {
                url: format!("{scheme}://{e}"),
                client: tokio::sync::OnceCell::new(),
            })
            .collect();
        let store = Self {
            members,
            pinned: std::sync::atomic::AtomicUsize::new(0),
            options,
            settings,
            fleet_written: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        };
        // With auth, the credentials are checked now (on the first member that answers), not at the first write.
        store.client().await?;
        Ok(store)
    }

    fn member(&self, index: usize) -> Option<&Member> {
        self.members.get(index % self.members.len().max(1))
    }

    async fn member_client(&self, index: usize) -> Result<Client, etcd_client::Error> {
        let member = self
            .member(index)
            .ok_or_else(|| etcd_client::Error::InvalidArgs("no etcd endpoint".to_string()))?;
        member
            .client
            .get_or_try_init(|| Client::connect([member.url.as_str()], Some(self.options.clone())))
            .await
            .cloned()
    }

    /// Moves to the next member (the pinned one failed).
    pub fn next_member(&self, failed_index: usize) {
        let _ = self.pinned.compare_exchange(
            failed_index,
            failed_index.wrapping_add(1) % self.members.len().max(1),
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Moves to the next member after a stream on the pinned one broke.
    pub fn move_on(&self) {
        self.next_member(self.pinned.load(std::sync::atomic::Ordering::Relaxed));
    }

    /// A client of the pinned member, for a stream (a watch, a lease's renewals): the next member when it
    /// does not connect.
    pub async fn client(&self) -> Result<Client, StateError> {
        let mut last = None;
        for _ in 0..self.members.len() {
            let index = self.pinned.load(std::sync::atomic::Ordering::Relaxed);
            match self.member_client(index).await {
                Ok(client) => return Ok(client),
                Err(err) => {
                    self.next_member(index);
                    last = Some(err);
                }
            }
        }
        Err(failed(
            "connect",
            last.map_or_else(|| "no endpoint".to_string(), |e| brief(&e)),
        ))
    }

    /// Makes a request on the pinned member, and on the next ones while it fails for a reason another member
    /// or a moment may cure (every member is tried, then one more time). A transaction is safe to make again:
    /// it is guarded by the revision it was made from, so one that did land the first time is refused as a
    /// conflict, not applied twice.
    pub async fn retrying<T, F, Fut>(&self, mut request: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempts = self.members.len() + 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let index = self.pinned.load(std::sync::atomic::Ordering::Relaxed);
            let answer = match self.member_client(index).await {
                Ok(client) => request(client).await,
                Err(err) => Err(err),
            };
            match answer {
                Err(err) if attempt < attempts && transient(&err) => {
                    self.next_member(index);
                    if attempt >= self.members.len() {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                answer => return answer,
            }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "etcd {} (prefix {})",
            self.settings.endpoints.join(","),
            self.settings.prefix
        )
    }

    /// A key under the store's prefix.
    pub fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.settings.prefix).into_bytes()
    }

    /// Where releases before the shards kept this replica's whole fleet.
    fn legacy_fleet_key(&self) -> Vec<u8> {
        self.key(&format!("fleet/{}", self.settings.replica))
    }

    fn fleet_shard_key(&self, shard: u32) -> Vec<u8> {
        self.key(&format!("fleets/{}/{shard}", self.settings.replica))
    }

    /// One key's value and revisions (`what`: for the error, "read the state").
    async fn get(
        &self,
        key: Vec<u8>,
        what: &str,
    ) -> Result<Option<etcd_client::KeyValue>, StateError> {
        let mut response = self
            .retrying(|mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await
            .map_err(|err| failed(what, brief(&err)))?;
        Ok(response.take_kvs().into_iter().next())
    }

    /// Every key under `rest` (under the store's prefix), with their values (`what`: for the error).
    async fn get_prefix(
        &self,
        rest: &str,
        what: &str,
    ) -> Result<etcd_client::GetResponse, StateError> {
        let key = self.key(rest);
        self.retrying(|mut c| {
            let key = key.clone();
            async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
        })
        .await
        .map_err(|err| failed(what, brief(&err)))
    }

    pub async fn load(&self) -> Result<Option<(Saved, Revision)>, StateError> {
        let Some(kv) = self.get(self.key("state"), "read the state").await? else {
            return Ok(None);
        };
        let mut saved = decode(kv.value(), &self.describe())?;
        saved.fleet = self.load_fleet().await?;
        Ok(Some((saved, kv.mod_revision())))
    }

    /// This replica's fleet as it last saved it (empty when it never did; a document that is not a fleet is
    /// skipped, and said).
    async fn load_fleet(&self) -> Result<Vec<KnownEnvoy>, StateError> {
        let prefix = format!("fleets/{}/", self.settings.replica);
        let mut response = self.get_prefix(&prefix, "read the fleet").await?;
        let mut values: Vec<Vec<u8>> = response
            .take_kvs()
            .into_iter()
            .map(|kv| kv.value().to_vec())
            .collect();
        if values.is_empty() {
            if let Some(kv) = self.get(self.legacy_fleet_key(), "read the fleet").await? {
                values.push(kv.value().to_vec());
            }
        }
        let mut known = Vec::new();
        for value in values {
            match serde_json::from_slice::<FleetDoc>(&value) {
                Ok(doc) => known.extend(doc.envoys.iter().map(KnownEnvoy::of)),
                Err(err) => eprintln!(
                    "canaryctl: {}: part of this replica's fleet is not readable, starting without it: {}",
                    self.describe(),
                    canary_router::text::one_line(&err.to_string(), canary_router::text::MAX_LINE)
                ),
            }
        }
        Ok(known)
    }

    pub async fn create(&self, saved: &Saved) -> Result<Option<Revision>, StateError> {
        let body = encode(
            &saved.desired,
            &[],
            &saved.rollouts,
            Some(&self.settings.replica),
        )?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key("state"),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(self.key("state"), body, None)]);
        let response = self
            .retrying(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|err| failed("create the state", brief(&err)))?;
        if !response.succeeded() {
            return Ok(None);
        }
        let revision = response.header().map_or(0, |h| h.revision());
        // A migrated state's fleet: this replica's to start from, until its Envoys reconnect.
        let fleet: Vec<EnvoyStatus> = saved.fleet.iter().map(known_as_status).collect();
        self.save_fleet(&fleet).await?;
        Ok(Some(revision))
    }

    pub async fn save(
        &self,
        desired: &Desired,
        rollouts: &[Rollout],
        expected: Revision,
        fence: Option<&Fence>,
    ) -> Result<Revision, SaveError> {
        let body = encode(desired, &[], rollouts, Some(&self.settings.replica))
            .map_err(SaveError::Failed)?;
        let mut when = vec![Compare::mod_revision(
            self.key("state"),
            CompareOp::Equal,
            expected,
        )];
        let mut otherwise = Vec::new();
        if let Some(fence) = fence {
            when.push(Compare::create_revision(
                fence.key.clone(),
                CompareOp::Equal,
                fence.create_revision,
            ));
            otherwise.push(TxnOp::get(fence.key.clone(), None));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(self.key("state"), body, None)])
            .or_else(otherwise);
        let response = self
            .retrying(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|err| SaveError::Failed(failed("save the state", brief(&err))))?;
        if response.succeeded() {
            return Ok(response.header().map_or(0, |h| h.revision()));
        }
        if let Some(fence) = fence {
            let stands = response.op_responses().iter().any(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == fence.create_revision),
                _ => false,
            });
            if !stands {
                return Err(SaveError::NotLeader);
            }
        }
        Err(SaveError::Conflict)
    }

    /// Publishes this replica's Envoys (what other replicas merge into their fleet view, and what this one
    /// restarts from): each shard whose Envoys changed since the last save, one request each (so that no request
    /// nears etcd's limit, whatever the fleet).
    pub async fn save_fleet(&self, envoys: &[EnvoyStatus]) -> Result<(), StateError> {
        let docs = crate::fleet::shards(envoys, crate::state::now_unix());
        let first = {
            let written = crate::server::lock(&self.fleet_written);
            written.is_empty()
        };
        for (shard, doc) in (0u32..).zip(&docs) {
            let unchanged = crate::server::lock(&self.fleet_written)
                .get(&shard)
                .is_some_and(|before| *before == doc.envoys);
            if unchanged {
                continue;
            }
            let value = serde_json::to_vec(doc)
                .map_err(|err| StateError::Io(format!("cannot encode the fleet: {err}")))?;
            let key = self.fleet_shard_key(shard);
            self.retrying(|mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move { c.put(key, value, None).await }
            })
            .await
            .map_err(|err| failed("save the fleet", brief(&err)))?;
            crate::server::lock(&self.fleet_written).insert(shard, doc.envoys.clone());
        }
        if first {
            // What a release before the shards wrote, now superseded (nothing when there is none).
            let key = self.legacy_fleet_key();
            self.retrying(|mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await
            .map_err(|err| failed("save the fleet", brief(&err)))?;
        }
        Ok(())
    }

    pub async fn recover(
        &self,
        config: canary_router::config::RawConfig,
    ) -> Result<(Saved, Revision), StateError> {
        let Some(kv) = self.get(self.key("state"), "read the state").await? else {
            return Err(StateError::Edit(format!(
                "{}: no state to recover: start with --init-config FILE",
                self.describe()
            )));
        };
        match decode(kv.value(), &self.describe()) {
            Err(StateError::SavedConfigRefused { .. }) => {}
            Ok(saved) => {
                return Err(StateError::Edit(format!(
                    "{}: its config (version {}) is valid: --recover-config only replaces a refused one; \
                     change a valid config with `canaryctl apply`",
                    self.describe(),
                    saved.desired.version
                )))
            }
            Err(err) => return Err(err),
        }
        let mut saved = recovered(kv.value(), &self.describe(), config)?;
        saved.fleet = self.load_fleet().await?;
        match self
            .save(&saved.desired, &saved.rollouts, kv.mod_revision(), None)
            .await
        {
            Ok(revision) => Ok((saved, revision)),
            Err(SaveError::Failed(err)) => Err(err),
            Err(_) => Err(StateError::Io(format!(
                "{}: the state changed while it was recovered: start again",
                self.describe()
            ))),
        }
    }

    /// Every key under the prefix (its part after the prefix, its value), and the store's revision then.
    pub async fn load_all(&self) -> Result<(Vec<Entry>, Revision), StateError> {
        let mut response = self.get_prefix("", "read the store").await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let entries = response
            .take_kvs()
            .into_iter()
            .map(|kv| Entry {
                key: self.rest_of(kv.key()),
                value: Some(kv.value().to_vec()),
                revision: kv.mod_revision(),
            })
            .collect();
        Ok((entries, revision))
    }

    fn rest_of(&self, key: &[u8]) -> String {
        let key = String::from_utf8_lossy(key);
        key.strip_prefix(self.settings.prefix.as_str())
            .unwrap_or(&key)
            .to_string()
    }

    /// Watches every key under the prefix from `after` (exclusive).
    pub async fn watch_all(&self, after: Revision) -> Result<PrefixWatch<'_>, StateError> {
        let mut client = self.client().await?;
        let stream = client
            .watch(
                self.key(""),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(after + 1),
                ),
            )
            .await
            .map_err(|err| failed("watch the store", brief(&err)))?;
        Ok(PrefixWatch {
            stream,
            store: self,
        })
    }

    /// Puts `value` at `key` under `lease` (0: none).
    pub async fn put_leased(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), StateError> {
        self.retrying(|mut c| {
            let (key, value) = (key.clone(), value.clone());
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            async move { c.put(key, value, options).await }
        })
        .await
        .map_err(|err| failed("put", brief(&err)))?;
        Ok(())
    }

    /// Every key under `rest` of the prefix, with its value.
    pub async fn list(&self, rest: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let key = self.key(rest);
        let response = self
            .retrying(|mut c| {
                let key = key.clone();
                async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await
            .map_err(|err| failed("list", brief(&err)))?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }
}

/// A remembered Envoy as a published one: not connected to this replica.
fn known_as_status(known: &KnownEnvoy) -> EnvoyStatus {
    EnvoyStatus {
        node_id: known.node_id.clone(),
        cluster: known.cluster.clone(),
        peer: String::new(),
        link: Link::Disconnected,
        streams: 0,
        first_seen_unix: known.first_seen_unix,
        last_seen_unix: known.last_seen_unix,
        disconnected_since_unix: Some(known.last_seen_unix),
        in_fleet: true,
        sent_version: None,
        acked_version: known.acked_version,
        nack: None,
        certificate: None,
        replica: None,
    }
}

/// One key under the prefix as read or watched: its value (None: deleted) and revision.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub revision: Revision,
}

/// The changes under the prefix, as they come.
pub struct PrefixWatch<'a> {
    stream: etcd_client::WatchStream,
    store: &'a EtcdStore,
}

impl PrefixWatch<'_> {
    /// The next changes, in order; `Err` when the watch ended (etcd unreachable, history compacted): read
    /// the store again and watch from there.
    pub async fn next(&mut self) -> Result<Vec<Entry>, StateError> {
        loop {
            let response = self
                .stream
                .message()
                .await
                .map_err(|err| failed("watch the store", brief(&err)))?
                .ok_or_else(|| StateError::Io("etcd: the store's watch ended".to_string()))?;
            if response.canceled() {
                return Err(StateError::Io(format!(
                    "etcd: the store's watch was cancelled (compacted at {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                )));
            }
            let entries: Vec<Entry> = response
                .events()
                .iter()
                .filter_map(|event| {
                    let kv = event.kv()?;
                    let deleted = event.event_type() == etcd_client::EventType::Delete;
                    Some(Entry {
                        key: self.store.rest_of(kv.key()),
                        value: (!deleted).then(|| kv.value().to_vec()),
                        revision: kv.mod_revision(),
                    })
                })
                .collect();
            if !entries.is_empty() {
                return Ok(entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_url_names_every_member_or_is_refused_naming_the_bad_one() {
        assert_eq!(endpoints_of("/var/lib/state.json"), None);
        assert_eq!(
            endpoints_of("etcd://10.0.0.1:2379, etcd-b:2379/").unwrap(),
            Ok(vec!["10.0.0.1:2379".to_string(), "etcd-b:2379".to_string()])
        );
        let refused = endpoints_of("etcd://h1:2379,,h2").unwrap().unwrap_err();
        assert!(
            refused.contains("endpoint \"\" is not host:port"),
            "{refused}"
        );
        let refused = endpoints_of("etcd://h1").unwrap().unwrap_err();
        assert!(refused.contains("\"h1\""), "{refused}");
    }

    #[test]
    fn an_etcd_error_is_said_in_its_grpc_words() {
        let err =
            etcd_client::Error::GRpcStatus(tonic::Status::unavailable("etcdserver: no leader"));
        assert_eq!(brief(&err), "unavailable: etcdserver: no leader");
        assert!(transient(&err));
        let err = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument("too large"));
        assert!(!transient(&err));
    }
}
