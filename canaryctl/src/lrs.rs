//! Envoy's load reports (LRS) on the gRPC port: per upstream cluster, the requests its hosts completed and how
//! many failed (5xx, resets, connect failures, timeouts). These are per-host counters, so they see the
//! attempts the canary → stable fallback hid from users, which per-cluster response-code stats do not.
//!
//! Each Envoy opens one stream; canaryctl asks for every cluster, every second unless the fleet is large. A report carries the counts
//! since that Envoy's previous one, so the reports of every Envoy are simply added up per cluster. The cost
//! is one message per Envoy per interval, whatever the traffic: 61 KB with Envoy 1.40, whose node is in every
//! report, read with [`crate::intake::LoadReport`] (the node skipped after the stream's first).
//!
//! That is the one part of the cost canaryctl can set: by default ([`LoadInterval::Auto`]) a replica asks for
//! reports every second while it holds up to [`AUTO_REPORTS_PER_S`] load streams, and less often beyond
//! (every 5 s at 10,000), on every open stream at once (Envoy takes a new interval mid-stream and keeps the
//! counts since its last report). Nothing is lost but time: a verdict waits for up to one more interval.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterStats;
use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsResponse;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::Grpc;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::intake::{Call, LoadReport, Rpc};
use crate::server::{Metrics, Server, StreamKind};
use crate::tls::Peer;
use crate::xds::authorise;

/// Load streams one replica takes a report a second from, with [`LoadInterval::Auto`]; beyond, it asks for
/// them less often.
pub const AUTO_REPORTS_PER_S: usize = 2_000;
/// The longest interval [`LoadInterval::Auto`] asks for, seconds.
pub const AUTO_MAX_S: u64 = 10;

/// How often canaryctl asks the Envoys for their load reports (`serve --load-report-interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadInterval {
    /// Every second up to [`AUTO_REPORTS_PER_S`] load streams on this replica, then one second more per as
    /// many again (at most [`AUTO_MAX_S`]).
    Auto,
    /// Every that many seconds, whatever the fleet.
    Every(u64),
}

impl LoadInterval {
    /// `auto`, or whole seconds from 1 s to a minute (`5s`, `1m`).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        let every = humantime::parse_duration(text)
            .map_err(|err| format!("load-report-interval: {text:?}: {err} (auto, or 1s to 60s)"))?;
        if every.subsec_nanos() != 0 || !(1..=60).contains(&every.as_secs()) {
            return Err(format!(
                "load-report-interval: {text:?}: whole seconds from 1s to 60s, or auto"
            ));
        }
        Ok(Self::Every(every.as_secs()))
    }

    /// The interval to ask of `streams` load streams, `current` being the one asked now. Auto raises it as
    /// soon as the streams are more than the budget takes, and lowers it only once they fit 90 % of the lower
    /// interval's budget, so a fleet near a bound does not make every Envoy change its pace back and forth.
    pub fn seconds(self, streams: usize, current: u64) -> u64 {
        if let Self::Every(every) = self {
            return every;
        }
        let needed = |budget: usize| (streams.div_ceil(budget.max(1)) as u64).clamp(1, AUTO_MAX_S);
        let up = needed(AUTO_REPORTS_PER_S);
        let down = needed(AUTO_REPORTS_PER_S * 9 / 10);
        if up > current {
            up
        } else if down < current {
            down
        } else {
            current
        }
    }
}

/// What canaryctl answers a load stream: every cluster, every `every` seconds.
fn ask(every: u64) -> LoadStatsResponse {
    LoadStatsResponse {
        send_all_clusters: true,
        load_reporting_interval: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: every as i64,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Each cluster's (requests, errors) in one report, or why it is beyond `max_rate` requests a second for the
/// interval it covers (as Envoy says, from 1 s to a minute).
pub fn plausible(
    clusters: &[ClusterStats],
    max_rate: u64,
) -> Result<Vec<(&str, u64, u64)>, String> {
    let mut counts = Vec::with_capacity(clusters.len());
    for cluster in clusters {
        let (mut ok, mut errors) = (0u64, 0u64);
        for locality in &cluster.upstream_locality_stats {
            ok = ok.saturating_add(locality.total_successful_requests);
            errors = errors.saturating_add(locality.total_error_requests);
        }
        let requests = ok.saturating_add(errors);
        let seconds = cluster
            .load_report_interval
            .as_ref()
            .map_or(1, |d| d.seconds.saturating_add(i64::from(d.nanos > 0)))
            .clamp(1, 60) as u64;
        let bound = max_rate.saturating_mul(seconds);
        if requests > bound {
            return Err(format!(
                "{} requests of {} in {seconds}s",
                requests,
                canary_router::text::quote(&cluster.cluster_name)
            ));
        }
        counts.push((cluster.cluster_name.as_str(), requests, errors));
    }
    Ok(counts)
}

pub struct Lrs {
    server: Arc<Server>,
}

impl Rpc for Lrs {
    const SERVICE: &'static str = "envoy.service.load_stats.v3.LoadReportingService";
    const PATH: &'static str = "/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats";
    type Request = LoadReport;
    type Response = LoadStatsResponse;

    fn serve(
        self: Arc<Self>,
        mut grpc: Grpc<ProstCodec<LoadStatsResponse, LoadReport>>,
        request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>> {
        Box::pin(async move {
            let call = Call(move |request| self.clone().stream_load_stats(request));
            grpc.streaming(call, request).await
        })
    }
}

impl Lrs {
    pub fn new(server: Arc<Server>) -> Self {
        Self { server }
    }

    async fn stream_load_stats(
        self: Arc<Self>,
        request: Request<Streaming<LoadReport>>,
    ) -> Result<Response<ReceiverStream<Result<LoadStatsResponse, Status>>>, Status> {
        let peer = Peer::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let server = self.server.clone();
        tokio::spawn(async move {
            let mut node: Option<String> = None;
            let mut cluster = String::new();
            let mut pace = server.load_every.subscribe();
            let mut every = 1;
            loop {
                let report = tokio::select! {
                    report = inbound.message() => match report {
                        Ok(Some(report)) => report,
                        _ => break,
                    },
                    changed = pace.changed(), if node.is_some() => {
                        if changed.is_err() {
                            break;
                        }
                        // A new pace: Envoy reports next after the new interval, so until then this Envoy is
                        // waited for over the longer of the two.
                        let asked = *pace.borrow_and_update();
                        let id = node.as_deref().unwrap_or_default();
                        server.load_pace_asked(id, asked.max(every));
                        every = asked;
                        if tx.send(Ok(ask(every))).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                if node.is_none() {
                    // The stream is named (and, with mTLS, authorised) by its first report's node. Envoy puts
                    // the same node in every report; a later one is not read (61 KB to walk each second), and
                    // could change nothing: every count of the stream is the first node's.
                    let name = report.node_name();
                    if let Err(status) = authorise(&server, &peer, name.as_ref(), false) {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                    let id;
                    (id, cluster) = peer.reporter(name.as_ref());
                    server.stream_opened(&id, StreamKind::Load);
                    node = Some(id);
                    every = *pace.borrow_and_update();
                    if tx.send(Ok(ask(every))).await.is_err() {
                        break;
                    }
                }
                Metrics::bump(&server.metrics.load_reports);
                let id = node.as_deref().unwrap_or_default();
                if !server.admit_report(peer.addr, id, &cluster, "a load report") {
                    continue;
                }
                let counts = match plausible(&report.cluster_stats, server.max_report_rate) {
                    Ok(counts) => counts,
                    Err(what) => {
                        // The whole report: one absurd count makes the rest of it suspect too.
                        server.refuse_report(id, what);
                        continue;
                    }
                };
                for (cluster, requests, errors) in counts {
                    if requests > 0 {
                        server.report_load(id, cluster, requests, errors);
                    }
                }
                server.load_reported(id, every);
            }
            if let Some(id) = &node {
                server.stream_closed(id, StreamKind::Load);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::UpstreamLocalityStats;

    fn report(clusters: &[(&str, u64, u64, i64)]) -> Vec<ClusterStats> {
        clusters
            .iter()
            .map(|(name, ok, errors, seconds)| ClusterStats {
                cluster_name: name.to_string(),
                upstream_locality_stats: vec![
                    UpstreamLocalityStats {
                        total_successful_requests: *ok,
                        total_error_requests: *errors,
                        ..Default::default()
                    },
                    UpstreamLocalityStats {
                        total_successful_requests: *ok,
                        ..Default::default()
                    },
                ],
                load_report_interval: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: *seconds,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn auto_asks_for_reports_less_often_only_beyond_its_budget_and_does_not_flap_near_a_bound() {
        let auto = LoadInterval::Auto;
        assert_eq!(auto.seconds(0, 1), 1);
        assert_eq!(auto.seconds(AUTO_REPORTS_PER_S, 1), 1);
        assert_eq!(auto.seconds(AUTO_REPORTS_PER_S + 1, 1), 2);
        assert_eq!(auto.seconds(10_000, 1), 5);
        assert_eq!(auto.seconds(1_000_000, 1), AUTO_MAX_S);
        // Lowered only once the streams fit 90 % of the lower pace's budget.
        assert_eq!(auto.seconds(AUTO_REPORTS_PER_S, 2), 2);
        assert_eq!(auto.seconds(AUTO_REPORTS_PER_S * 9 / 10 + 1, 2), 2);
        assert_eq!(auto.seconds(AUTO_REPORTS_PER_S * 9 / 10, 2), 1);
        assert_eq!(auto.seconds(9_000, 5), 5);
        assert_eq!(auto.seconds(7_000, 5), 4);
        // Whatever it asks, Envoy's reports stay within a budget a second.
        for streams in (0..40_000).step_by(97) {
            let every = auto.seconds(streams, 1);
            assert!(
                streams as u64 <= AUTO_REPORTS_PER_S as u64 * every || every == AUTO_MAX_S,
                "{streams}: {every}"
            );
        }
        // A fixed pace is a fixed pace.
        assert_eq!(LoadInterval::Every(7).seconds(1, 1), 7);
        assert_eq!(LoadInterval::Every(7).seconds(1_000_000, 1), 7);
    }

    #[test]
    fn the_interval_flag_takes_auto_or_whole_seconds_up_to_a_minute_and_names_what_it_refuses() {
        assert_eq!(LoadInterval::parse("auto"), Ok(LoadInterval::Auto));
        assert_eq!(LoadInterval::parse("5s"), Ok(LoadInterval::Every(5)));
        assert_eq!(LoadInterval::parse("1m"), Ok(LoadInterval::Every(60)));
        for bad in ["0s", "61s", "1500ms", "fast", ""] {
            let err = LoadInterval::parse(bad).unwrap_err();
            assert!(
                err.starts_with(&format!("load-report-interval: {bad:?}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_report_beyond_the_rate_for_its_interval_is_refused_whole_and_sums_never_wrap() {
        let fine = report(&[("app-v1", 400, 2, 1), ("app-v2", 50, 0, 1)]);
        assert_eq!(
            plausible(&fine, 1000).unwrap(),
            [("app-v1", 802, 2), ("app-v2", 100, 0)]
        );
        // 3000 in 5 s is within 1000 a second; in 1 s it is not, and the whole report goes.
        assert!(plausible(&report(&[("app-v1", 1500, 0, 5)]), 1000).is_ok());
        let two = report(&[("app-v2", 1, 0, 1), ("app-v1", 1500, 0, 1)]);
        assert_eq!(
            plausible(&two, 1000).unwrap_err(),
            r#"3000 requests of "app-v1" in 1s"#
        );
        // Near 2^64 in two localities: saturates, and is refused at any bound but the largest.
        let absurd = report(&[("app-v1", u64::MAX, u64::MAX, 1)]);
        assert_eq!(
            plausible(&absurd, crate::server::DEFAULT_MAX_REPORT_RATE).unwrap_err(),
            format!(r#"{} requests of "app-v1" in 1s"#, u64::MAX)
        );
        assert_eq!(plausible(&absurd, u64::MAX).unwrap()[0].1, u64::MAX);
        // An interval claimed beyond a minute counts as a minute.
        assert!(plausible(&report(&[("app-v1", 40_000, 0, 3600)]), 1000).is_err());
    }
}
