//! Delivery of notifications (`serve --notify`): one bounded queue and one sender task per target.
//!
//! A rollout never waits on a receiver: [`Notifier::send`] only puts the event in each target's queue (no
//! await, no I/O) and returns. Each target's sender posts its events one at a time, in order: an event that
//! fails is tried again with backoff (0.5 s doubling to 10 s) before any later one, for up to
//! [`MAX_AGE`]; a receiver that answers 4xx (but 408 and 429) refused it for good and the next goes. A full
//! queue ([`QUEUE`] events) drops its oldest waiting event. Sent, failed (attempts) and dropped events are
//! counted for `/metrics`, and the log says when a target starts failing and when it takes events again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::notify::{self, Actor, Notice, Target};

/// Events waiting for one target, at most.
pub const QUEUE: usize = 1000;
/// An event not delivered this long after it was made is dropped.
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// One attempt's deadline: a receiver that hangs holds its own queue this long, nothing else.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// Who is making the admin request being served (set by the admin API's token check), for the events
    /// its writes cause.
    pub static OPERATOR: Actor;
}

/// The operator behind the admin request this task serves, if any.
pub fn current_operator() -> Option<Actor> {
    OPERATOR.try_with(|a| a.clone()).ok()
}

#[derive(Clone)]
struct Pending {
    /// Its place in this target's queue (from 1), to tell it from the events queued after it.
    n: u64,
    id: String,
    event: &'static str,
    body: Vec<u8>,
    signature: Option<String>,
    made: Instant,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Pending>,
    /// The `n` of the event being posted (never dropped for room while it is).
    posting: Option<u64>,
    queued: u64,
}

/// One target: its queue and counters.
pub struct Lane {
    pub target: Target,
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Lane {
    pub fn waiting(&self) -> usize {
        lock(&self.queue).items.len()
    }
}

/// Every `--notify` target, and the secret that signs their bodies.
pub struct Notifier {
    lanes: Vec<Arc<Lane>>,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
}

/// What a failed attempt means for its event.
enum Failure {
    /// Try it again later (no answer, 5xx, 408, 429).
    Again(String),
    /// The receiver refused it (another 4xx, or a redirect): the next event goes.
    Refused(String),
}

impl Notifier {
    pub fn new(targets: Vec<Target>, secret: Option<Vec<u8>>) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("canaryctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| format!("--notify: the HTTP client: {err}"))?;
        let lanes = targets
            .into_iter()
            .map(|target| {
                Arc::new(Lane {
                    target,
                    queue: Mutex::new(Queue::default()),
                    wake: tokio::sync::Notify::new(),
                    sent: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                })
            })
            .collect();
        Ok(Notifier {
            lanes,
            secret,
            client,
        })
    }

    /// Whether bodies are signed (`--notify-secret-file`).
    pub fn signs(&self) -> bool {
        self.secret.is_some()
    }

    pub fn lanes(&self) -> &[Arc<Lane>] {
        &self.lanes
    }

    /// Starts each target's sender (on the current tokio runtime).
    pub fn spawn(self: &Arc<Self>) {
        for lane in &self.lanes {
            tokio::spawn(deliver(self.clone(), lane.clone()));
        }
    }

    /// Queues `notice` for every target that wants its rollout. Never waits.
    pub fn send(&self, notice: &Notice) {
        for lane in self
            .lanes
            .iter()
            .filter(|l| l.target.wants(&notice.rollout))
        {
            let body = lane.target.body(notice);
            let signature = self.secret.as_ref().map(|s| notify::sign(s, &body));
            let mut queue = lock(&lane.queue);
            if queue.items.len() >= QUEUE {
                // Room for the newest: the oldest that is not being posted goes.
                let at = usize::from(queue.posting.is_some() && queue.items.len() > 1);
                if let Some(gone) = queue.items.remove(at) {
                    lane.dropped.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "canaryctl: notify {}: {QUEUE} events waiting: dropped event {} ({})",
                        lane.target.label, gone.id, gone.event
                    );
                }
            }
            queue.queued += 1;
            let n = queue.queued;
            queue.items.push_back(Pending {
                n,
                id: notice.id.clone(),
                event: notice.kind.label(),
                body,
                signature,
                made: Instant::now(),
            });
            drop(queue);
            lane.wake.notify_one();
        }
    }

    async fn post(&self, lane: &Lane, pending: &Pending) -> Result<(), Failure> {
        let mut request = self
            .client
            .post(lane.target.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-canaryctl-event", pending.event)
            .header("x-canaryctl-delivery", &pending.id)
            .body(pending.body.clone());
        if let Some(signature) = &pending.signature {
            request = request.header(notify::SIGNATURE_HEADER, signature);
        }
        let response = request
            .send()
            .await
            // A URL may hold the webhook's secret: never in a message.
            .map_err(|err| Failure::Again(err.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let line = format!("answered {status}");
        if status.is_redirection() {
            return Err(Failure::Refused(format!(
                "{line}: redirects are not followed; give the final URL"
            )));
        }
        let again = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(if again {
            Failure::Again(line)
        } else {
            Failure::Refused(line)
        })
    }
}

/// Posts one target's events in order, for as long as the process runs.
async fn deliver(notifier: Arc<Notifier>, lane: Arc<Lane>) {
    let label = &lane.target.label;
    let mut backoff = FIRST_BACKOFF;
    let mut failing_since: Option<(Instant, u64)> = None;
    loop {
        let head = {
            let mut queue = lock(&lane.queue);
            let head = queue.items.front().cloned();
            queue.posting = head.as_ref().map(|p| p.n);
            head
        };
        let Some(pending) = head else {
            lane.wake.notified().await;
            continue;
        };
        let outcome = notifier.post(&lane, &pending).await;
        let done = |lane: &Lane| {
            let mut queue = lock(&lane.queue);
            queue.posting = None;
            if queue.items.front().map(|p| p.n) == Some(pending.n) {
                queue.items.pop_front();
            }
        };
        match outcome {
            Ok(()) => {
                done(&lane);
                lane.sent.fetch_add(1, Ordering::Relaxed);
                backoff = FIRST_BACKOFF;
                if let Some((since, attempts)) = failing_since.take() {
                    eprintln!(
                        "canaryctl: notify {label}: delivering again after {attempts} failed attempts over {}s",
                        since.elapsed().as_secs()
                    );
                }
            }
            Err(Failure::Refused(line)) => {
                done(&lane);
                lane.failed.fetch_add(1, Ordering::Relaxed);
                lane.dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "canaryctl: notify {label}: event {} ({}) {line}: not sent again",
                    pending.id, pending.event
                );
            }
            Err(Failure::Again(line)) => {
                lane.failed.fetch_add(1, Ordering::Relaxed);
                match &mut failing_since {
                    Some((_, attempts)) => *attempts += 1,
                    None => {
                        failing_since = Some((Instant::now(), 1));
                        eprintln!(
                            "canaryctl: notify {label}: event {} ({}): {line}; trying again with backoff ({} waiting)",
                            pending.id,
                            pending.event,
                            lane.waiting()
                        );
                    }
                }
                if pending.made.elapsed() >= MAX_AGE {
                    done(&lane);
                    lane.dropped.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "canaryctl: notify {label}: event {} ({}) dropped: not delivered in {}h",
                        pending.id,
                        pending.event,
                        MAX_AGE.as_secs() / 3600
                    );
                } else {
                    lock(&lane.queue).posting = None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::Kind;

    fn notice(n: u64) -> Notice {
        Notice {
            rollout: "web".into(),
            kind: Kind::Started,
            id: format!("web/1/{n}"),
            payload: serde_json::json!({ "seq": n }),
            text: format!("event {n}"),
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_waiting_event_never_the_newest_nor_the_one_being_posted() {
        let targets = vec![
            Target::parse("http://127.0.0.1:9/", 1).unwrap(),
            Target::parse("rollout=api,url=http://127.0.0.1:9/", 2).unwrap(),
        ];
        let notifier = Notifier::new(targets, Some(b"0123456789abcdef".to_vec())).unwrap();
        let [every, api] = notifier.lanes() else {
            panic!("two lanes")
        };
        for n in 1..=QUEUE as u64 {
            notifier.send(&notice(n));
        }
        assert_eq!(
            (every.waiting(), every.dropped.load(Ordering::Relaxed)),
            (QUEUE, 0)
        );
        // The first is being posted: the second goes to make room.
        lock(&every.queue).posting = Some(1);
        notifier.send(&notice(QUEUE as u64 + 1));
        let ids: Vec<String> = lock(&every.queue)
            .items
            .iter()
            .map(|p| p.id.clone())
            .collect();
        assert_eq!(ids.len(), QUEUE);
        assert_eq!(ids.first().map(String::as_str), Some("web/1/1"));
        assert_eq!(ids.get(1).map(String::as_str), Some("web/1/3"));
        assert_eq!(ids.last().map(String::as_str), Some("web/1/1001"));
        assert_eq!(every.dropped.load(Ordering::Relaxed), 1);
        // Signed over the exact body queued.
        let queue = lock(&every.queue);
        let first = queue.items.front().unwrap();
        assert_eq!(
            first.signature.as_deref(),
            Some(notify::sign(b"0123456789abcdef", &first.body).as_str())
        );
        // Another rollout's target took none of web's events.
        assert_eq!(api.waiting(), 0);
    }
}
