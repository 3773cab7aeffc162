//! Which replica judges the rollouts. With a state file there is one process and it always does. With etcd,
//! the replica holding the leader key does: the key is created under the replica's lease (a transaction that
//! succeeds only while no key exists), and every write the judge makes is conditioned on that key's
//! `create_revision` (see [`crate::store::Fence`]). A replica that stops renewing its lease (killed, frozen,
//! partitioned from etcd) loses the key when the lease expires; it stops judging on its own clock before that
//! (from when it last sent a renewal that was answered), and if it still tried, etcd would refuse the write.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;

use crate::state::now_unix;
use crate::store::etcd::{brief, REQUEST_TIMEOUT};
use crate::store::{Fence, Store};

/// A leader stops judging this long before its lease would expire at etcd (clocks drift, requests take time).
const MARGIN: Duration = Duration::from_millis(500);

/// How often the lease is renewed and a follower tries to take the lead.
const RENEW_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
enum Lead {
    /// The only replica (a state file): always judges, no fence.
    Alone,
    Following {
        leader: Option<String>,
    },
    Leading {
        fence: Fence,
        valid_until: Instant,
        since_unix: u64,
    },
}

/// What `status` shows of the leadership.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeaderView {
    /// "single" (a state file), "leader" or "follower".
    pub role: &'static str,
    /// The replica that judges the rollouts, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// This replica's name.
    pub replica: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leading_since_unix: Option<u64>,
}

pub struct Leadership {
    replica: String,
    lead: Mutex<Lead>,
    /// The lease this replica holds now (its entries in the store live with it).
    lease: Mutex<Option<i64>>,
}

impl Leadership {
    /// The only replica: it always judges.
    pub fn alone() -> Arc<Self> {
        Arc::new(Self {
            replica: String::new(),
            lead: Mutex::new(Lead::Alone),
            lease: Mutex::new(None),
        })
    }

    /// A replica that must win the lead before it judges.
    pub fn replica(name: &str) -> Arc<Self> {
        Arc::new(Self {
            replica: name.to_string(),
            lead: Mutex::new(Lead::Following { leader: None }),
            lease: Mutex::new(None),
        })
    }

    /// This replica's name (empty for the only one).
    pub fn name(&self) -> &str {
        &self.replica
    }

    /// The lease this replica holds, while it holds one.
    pub fn lease(&self) -> Option<i64> {
        *crate::server::lock(&self.lease)
    }

    fn set_lease(&self, lease: Option<i64>) {
        *crate::server::lock(&self.lease) = lease;
    }

    fn lead(&self) -> std::sync::MutexGuard<'_, Lead> {
        crate::server::lock(&self.lead)
    }

    /// Whether this replica may judge now, and the fence its writes carry: `None` when it may not;
    /// `Some(None)` when it is the only replica. A leader past its own deadline has lost the lead (said once).
    pub fn judge(&self) -> Option<Option<Fence>> {
        let mut lead = self.lead();
        match &*lead {
            Lead::Alone => Some(None),
            Lead::Following { .. } => None,
            Lead::Leading {
                fence, valid_until, ..
            } => {
                if Instant::now() < *valid_until {
                    return Some(Some(fence.clone()));
                }
                eprintln!(
                    "canaryctl: lost the lead: the lease was not renewed in time (paused, or etcd unreachable); \
                     this replica writes no rollout step until it leads again"
                );
                *lead = Lead::Following { leader: None };
                None
            }
        }
    }

    /// A judge's write was refused because its leader key is gone: it no longer leads.
    pub fn deposed(&self) {
        let mut lead = self.lead();
        if matches!(*lead, Lead::Leading { .. }) {
            eprintln!(
                "canaryctl: lost the lead: etcd refused a write fenced by this replica's leader key; nothing was written"
            );
            *lead = Lead::Following { leader: None };
        }
    }

    pub fn view(&self) -> LeaderView {
        let lead = self.lead().clone();
        let replica = self.replica.clone();
        match lead {
            Lead::Alone => LeaderView {
                role: "single",
                leader: None,
                replica,
                leading_since_unix: None,
            },
            Lead::Following { leader } => LeaderView {
                role: "follower",
                leader,
                replica,
                leading_since_unix: None,
            },
            Lead::Leading { since_unix, .. } => LeaderView {
                role: "leader",
                leader: Some(replica.clone()),
                replica,
                leading_since_unix: Some(since_unix),
            },
        }
    }

    /// Holds a lease and campaigns for the leader key, forever. `announce` is this replica's entry under
    /// `replicas/`, kept while its lease lives.
    pub async fn campaign(self: Arc<Self>, store: Arc<Store>, ttl: Duration, announce: Vec<u8>) {
        let Store::Etcd(store) = &*store else {
            return;
        };
        let ttl_s = i64::try_from(ttl.as_secs().max(2)).unwrap_or(4);
        let ttl = Duration::from_secs(ttl_s.unsigned_abs());
        let leader_key = store.key("leader");
        let mut last_error = String::new();
        // Each kind of failure ("cannot renew the lease") is said once, until another kind or the lead comes.
        let say = |last_error: &mut String, err: String| {
            let kind = err.split(':').next().unwrap_or_default().to_string();
            if kind != *last_error {
                eprintln!("canaryctl: leader election: {err}");
                *last_error = kind;
            }
        };
        loop {
            let granted_at = Instant::now();
            let lease = match store
                .retrying(|mut c| async move { c.lease_grant(ttl_s, None).await })
                .await
            {
                Ok(lease) => lease.id(),
                Err(err) => {
                    say(
                        &mut last_error,
                        format!("cannot get a lease from etcd: {}", brief(&err)),
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.set_lease(Some(lease));
            let member_key = store.key(&format!("replicas/{}", self.replica));
            if let Err(err) = store.put_leased(member_key, announce.clone(), lease).await {
                say(&mut last_error, err.to_string());
            }
            let mut alive_until = granted_at + ttl;
            let mut tick = tokio::time::interval(RENEW_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut renewed_at = Instant::now();
            // The renewals' stream, on the pinned member; opened again on the next member when it breaks.
            let mut renewals: Option<(
                etcd_client::LeaseKeeper,
                etcd_client::LeaseKeepAliveStream,
            )> = None;
            loop {
                tick.tick().await;
                if Instant::now() + MARGIN >= alive_until {
                    break; // the lease is (about to be) gone at etcd
                }
                if renewed_at.elapsed() >= Duration::from_secs(1) {
                    if renewals.is_none() {
                        let opened = match store.client().await {
                            Ok(mut client) => client
                                .lease_keep_alive(lease)
                                .await
                                .map_err(|err| brief(&err)),
                            Err(err) => Err(err.to_string()),
                        };
                        match opened {
                            Ok(pair) => renewals = Some(pair),
                            Err(err) => {
                                store.move_on();
                                say(&mut last_error, format!("cannot renew the lease: {err}"));
                            }
                        }
                    }
                    if let Some((keeper, answers)) = renewals.as_mut() {
                        let sent = Instant::now();
                        let answer = async {
                            keeper.keep_alive().await?;
                            answers.message().await
                        };
                        match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                                alive_until = sent + ttl;
                                renewed_at = sent;
                            }
                            Ok(Ok(Some(_))) => {
                                say(&mut last_error, "the lease expired at etcd".to_string());
                                break;
                            }
                            // The member went away: renew on the next one while the lease lives.
                            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                                renewals = None;
                                store.move_on();
                            }
                        }
                    }
                }
                let leading = matches!(*self.lead(), Lead::Leading { .. });
                if leading {
                    if let Lead::Leading { valid_until, .. } = &mut *self.lead() {
                        *valid_until = alive_until - MARGIN;
                    }
                    continue;
                }
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        leader_key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then([TxnOp::put(
                        leader_key.clone(),
                        self.replica.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(leader_key.clone(), None)]);
                match store
                    .retrying(|mut c| {
                        let txn = txn.clone();
                        async move { c.txn(txn).await }
                    })
                    .await
                {
                    Ok(answer) if answer.succeeded() => {
                        let revision = answer.header().map_or(0, |h| h.revision());
                        eprintln!(
                            "canaryctl: leads the rollouts (replica {}, leader key revision {revision}, lease {}s)",
                            self.replica,
                            ttl.as_secs()
                        );
                        *self.lead() = Lead::Leading {
                            fence: Fence {
                                key: leader_key.clone(),
                                create_revision: revision,
                            },
                            valid_until: alive_until - MARGIN,
                            since_unix: now_unix(),
                        };
                        last_error.clear();
                    }
                    Ok(answer) => {
                        let leader = answer.op_responses().iter().find_map(|op| match op {
                            TxnOpResponse::Get(get) => get
                                .kvs()
                                .first()
                                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                            _ => None,
                        });
                        *self.lead() = Lead::Following { leader };
                    }
                    Err(err) => say(
                        &mut last_error,
                        format!("cannot read the leader key: {}", brief(&err)),
                    ),
                }
            }
            // The lease is gone or going: stop judging now, and start over with a new one.
            self.set_lease(None);
            let was_leading = matches!(*self.lead(), Lead::Leading { .. });
            *self.lead() = Lead::Following { leader: None };
            if was_leading {
                eprintln!(
                    "canaryctl: lost the lead: the lease could not be renewed; this replica writes no rollout step until it leads again"
                );
            }
            let _ = tokio::time::timeout(
                REQUEST_TIMEOUT,
                store.retrying(|mut c| async move { c.lease_revoke(lease).await }),
            )
            .await;
        }
    }
}
