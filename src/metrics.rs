//! One typed registry of every metric outboxd exports (Prometheus names, `outboxd_` prefix).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric, registered in its own registry (so tests and several instances in one
/// process never share counters).
pub struct Metrics {
    registry: Registry,
    /// Rows published and acknowledged by Kafka, by table and topic.
    pub relay_published_total: IntCounterVec,
    /// Failures while publishing, by table and kind (`kafka` = batch rolled back,
    /// `database` = lane connection failed, `refused` = Kafka refused a row,
    /// `bad_row` = a row that cannot become a message).
    pub relay_publish_errors_total: IntCounterVec,
    /// Rows per claimed batch.
    pub relay_batch_rows: Histogram,
    /// Seconds from the row's `created_at` to Kafka's acknowledgement.
    pub relay_publish_delay_seconds: HistogramVec,
    /// Rows waiting in the outbox, by table (sampled by the maintenance task).
    pub relay_backlog_rows: IntGaugeVec,
    /// Age of the oldest waiting row, by table.
    pub relay_oldest_pending_seconds: prometheus::GaugeVec,
    /// Lanes this process owns, by table.
    pub relay_lanes_owned: IntGaugeVec,
    /// Rows moved to `outboxd_dead_rows`, by table.
    pub relay_dead_rows_total: IntCounterVec,
    /// Batches claimed and sent while a slow short batch still waited for Kafka, by table.
    pub relay_early_batches_total: IntCounterVec,
    /// Claims that found no row to publish, by table: an idle lane's polls and wake-ups,
    /// claims that came back empty while a batch was in flight, and rows held back behind
    /// an open transaction.
    pub relay_empty_claims_total: IntCounterVec,
    /// Seconds a batch spends in each phase of its cycle, by table and phase: `claim`
    /// (the claim statements, from the first to the last chunk), `kafka` (from its last
    /// row sent to every delivery report in) and `commit`.
    pub relay_batch_phase_seconds: HistogramVec,
    /// Consumed messages by topic, handler and final outcome (`done`, `dead_letter`,
    /// `skipped`).
    pub consumer_messages_total: IntCounterVec,
    /// Seconds per handler call.
    pub consumer_handler_seconds: HistogramVec,
    /// Handler calls that failed retryably and were retried.
    pub consumer_retries_total: IntCounterVec,
    /// Dead letters produced, by original topic and reason (error class).
    pub consumer_dead_letter_total: IntCounterVec,
    /// Messages between the consumer's position and the end of each partition (from
    /// librdkafka statistics, every 5 s).
    pub consumer_lag: IntGaugeVec,
    /// Handler calls running now.
    pub consumer_in_flight: IntGaugeVec,
    /// 1 while a handler is down (its downstream failing for many keys at once): no call
    /// starts for it but one probe at a time. `handler="-"` is the dead-letter producer.
    pub consumer_handler_down: IntGaugeVec,
    /// Times a handler went down.
    pub consumer_handler_outages_total: IntCounterVec,
    /// Probe calls made while a handler was down.
    pub consumer_probe_calls_total: IntCounterVec,
    /// Events per transaction of a `sql` handler, or per request of an `http` handler with
    /// `batch_size` above 1.
    pub consumer_batch_size: HistogramVec,
    /// Batches run again without a message that failed for good inside them (`sql`), or
    /// split in halves after a status that dead-letters (`http`).
    pub consumer_batch_splits_total: IntCounterVec,
    /// 1 while this relay sees another relay of the table with a different `lanes` and so
    /// holds no lane.
    pub relay_lanes_conflict: IntGaugeVec,
    /// WAL capture: bytes of WAL between the server's current position and the slot's
    /// confirmed one (what the slot keeps PostgreSQL from recycling), by table.
    pub relay_slot_lag_bytes: IntGaugeVec,
    /// Messages fetched above each partition's committed offset (final or not), as of
    /// the last commit published.
    pub consumer_pending: IntGaugeVec,
    /// Keys (lanes) of each partition whose message in delivery is in retry: their later
    /// messages wait behind it.
    pub consumer_keys_in_retry: IntGaugeVec,
    /// Messages handed on by a restart or rebalance that the commit metadata recorded as
    /// final, so not handled again, by topic.
    pub consumer_already_final_total: IntCounterVec,
    /// Commits whose map of final offsets did not fit `offset_metadata_max_bytes` and was
    /// left out (a restart then handles those messages again), by topic.
    pub consumer_offset_metadata_overflow_total: IntCounterVec,
    /// Messages of a partition held until outboxd restarts (a dead letter Kafka refuses
    /// even stripped, or an unrouted message with `unrouted = "fail"`); above 0 is an
    /// alert.
    pub consumer_partition_stopped: IntGaugeVec,
    /// Partitions assigned to this member, by topic: 0 on every member but one, or
    /// changing often, points at the group rather than the handlers.
    pub consumer_assigned_partitions: IntGaugeVec,
    /// Tasks that panicked, by task (`relay lane`, `partition worker`, ...): each was
    /// restarted, or the process stopped with exit code 70.
    pub task_panics_total: IntCounterVec,
    /// Constant 1, labelled with the version.
    pub build_info: IntGaugeVec,
    /// 1 while the daemon runs.
    pub up: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("outboxd".into()), None)
            .expect("static registry prefix is valid");
        let m = Metrics {
            relay_published_total: IntCounterVec::new(
                Opts::new(
                    "relay_published_total",
                    "Rows published and acknowledged by Kafka",
                ),
                &["table", "topic"],
            )
            .unwrap(),
            relay_publish_errors_total: IntCounterVec::new(
                Opts::new("relay_publish_errors_total", "Publish failures by kind"),
                &["table", "kind"],
            )
            .unwrap(),
            relay_batch_rows: Histogram::with_opts(
                HistogramOpts::new("relay_batch_rows", "Rows per claimed batch").buckets(vec![
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                ]),
            )
            .unwrap(),
            relay_publish_delay_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "relay_publish_delay_seconds",
                    "Seconds from row created_at to Kafka acknowledgement",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
                &["table"],
            )
            .unwrap(),
            relay_backlog_rows: IntGaugeVec::new(
                Opts::new("relay_backlog_rows", "Rows waiting in the outbox table"),
                &["table"],
            )
            .unwrap(),
            relay_oldest_pending_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "relay_oldest_pending_seconds",
                    "Age of the oldest waiting row in seconds",
                ),
                &["table"],
            )
            .unwrap(),
            relay_lanes_owned: IntGaugeVec::new(
                Opts::new("relay_lanes_owned", "Lanes owned by this process"),
                &["table"],
            )
            .unwrap(),
            relay_dead_rows_total: IntCounterVec::new(
                Opts::new("relay_dead_rows_total", "Rows moved to outboxd_dead_rows"),
                &["table"],
            )
            .unwrap(),
            relay_early_batches_total: IntCounterVec::new(
                Opts::new(
                    "relay_early_batches_total",
                    "Batches sent while a slow short batch still waited for Kafka",
                ),
                &["table"],
            )
            .unwrap(),
            relay_empty_claims_total: IntCounterVec::new(
                Opts::new(
                    "relay_empty_claims_total",
                    "Claims that found no row to publish",
                ),
                &["table"],
            )
            .unwrap(),
            relay_batch_phase_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "relay_batch_phase_seconds",
                    "Seconds a relay batch spends claiming, waiting for Kafka and committing",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["table", "phase"],
            )
            .unwrap(),
            consumer_messages_total: IntCounterVec::new(
                Opts::new(
                    "consumer_messages_total",
                    "Consumed messages by final outcome",
                ),
                &["topic", "handler", "outcome"],
            )
            .unwrap(),
            consumer_handler_seconds: HistogramVec::new(
                HistogramOpts::new("consumer_handler_seconds", "Seconds per handler call").buckets(
                    vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0,
                    ],
                ),
                &["handler"],
            )
            .unwrap(),
            consumer_retries_total: IntCounterVec::new(
                Opts::new("consumer_retries_total", "Handler calls retried"),
                &["handler"],
            )
            .unwrap(),
            consumer_dead_letter_total: IntCounterVec::new(
                Opts::new("consumer_dead_letter_total", "Dead letters produced"),
                &["topic", "reason"],
            )
            .unwrap(),
            consumer_lag: IntGaugeVec::new(
                Opts::new("consumer_lag", "Messages behind the end of the partition"),
                &["topic", "partition"],
            )
            .unwrap(),
            consumer_in_flight: IntGaugeVec::new(
                Opts::new("consumer_in_flight", "Handler calls running now"),
                &["handler"],
            )
            .unwrap(),
            consumer_handler_down: IntGaugeVec::new(
                Opts::new(
                    "consumer_handler_down",
                    "1 while the handler is down and only probed",
                ),
                &["handler"],
            )
            .unwrap(),
            consumer_handler_outages_total: IntCounterVec::new(
                Opts::new(
                    "consumer_handler_outages_total",
                    "Times the handler went down",
                ),
                &["handler"],
            )
            .unwrap(),
            consumer_probe_calls_total: IntCounterVec::new(
                Opts::new(
                    "consumer_probe_calls_total",
                    "Probe calls made while the handler was down",
                ),
                &["handler"],
            )
            .unwrap(),
            consumer_batch_size: HistogramVec::new(
                HistogramOpts::new(
                    "consumer_batch_size",
                    "Events per handler transaction or request",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                ]),
                &["handler"],
            )
            .unwrap(),
            consumer_batch_splits_total: IntCounterVec::new(
                Opts::new(
                    "consumer_batch_splits_total",
                    "Batches run again, or split, after a message failed for good inside them",
                ),
                &["handler"],
            )
            .unwrap(),
            consumer_pending: IntGaugeVec::new(
                Opts::new(
                    "consumer_pending",
                    "Messages fetched above the partition's committed offset",
                ),
                &["topic", "partition"],
            )
            .unwrap(),
            consumer_keys_in_retry: IntGaugeVec::new(
                Opts::new(
                    "consumer_keys_in_retry",
                    "Keys whose message in delivery is in retry, holding back their later messages",
                ),
                &["topic", "partition"],
            )
            .unwrap(),
            consumer_already_final_total: IntCounterVec::new(
                Opts::new(
                    "consumer_already_final_total",
                    "Redelivered messages the commit metadata recorded as final, not handled again",
                ),
                &["topic"],
            )
            .unwrap(),
            consumer_offset_metadata_overflow_total: IntCounterVec::new(
                Opts::new(
                    "consumer_offset_metadata_overflow_total",
                    "Commits whose map of final offsets did not fit and was left out",
                ),
                &["topic"],
            )
            .unwrap(),
            relay_lanes_conflict: IntGaugeVec::new(
                Opts::new(
                    "relay_lanes_conflict",
                    "1 while another relay of the table runs with a different lanes setting",
                ),
                &["table"],
            )
            .unwrap(),
            relay_slot_lag_bytes: IntGaugeVec::new(
                Opts::new(
                    "relay_slot_lag_bytes",
                    "WAL bytes between the server's position and the slot's confirmed one",
                ),
                &["table"],
            )
            .unwrap(),
            consumer_partition_stopped: IntGaugeVec::new(
                Opts::new(
                    "consumer_partition_stopped",
                    "Messages of the partition held until outboxd restarts",
                ),
                &["topic", "partition"],
            )
            .unwrap(),
            consumer_assigned_partitions: IntGaugeVec::new(
                Opts::new(
                    "consumer_assigned_partitions",
                    "Partitions assigned to this member",
                ),
                &["topic"],
            )
            .unwrap(),
            task_panics_total: IntCounterVec::new(
                Opts::new(
                    "task_panics_total",
                    "Tasks that panicked (restarted, or the process stopped)",
                ),
                &["task"],
            )
            .unwrap(),
            build_info: IntGaugeVec::new(
                Opts::new("build_info", "Build information"),
                &["version"],
            )
            .unwrap(),
            up: IntGauge::new("up", "1 while outboxd runs").unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.relay_published_total.clone()),
            Box::new(m.relay_publish_errors_total.clone()),
            Box::new(m.relay_batch_rows.clone()),
            Box::new(m.relay_publish_delay_seconds.clone()),
            Box::new(m.relay_backlog_rows.clone()),
            Box::new(m.relay_oldest_pending_seconds.clone()),
            Box::new(m.relay_lanes_owned.clone()),
            Box::new(m.relay_dead_rows_total.clone()),
            Box::new(m.relay_early_batches_total.clone()),
            Box::new(m.relay_empty_claims_total.clone()),
            Box::new(m.relay_batch_phase_seconds.clone()),
            Box::new(m.consumer_messages_total.clone()),
            Box::new(m.consumer_handler_seconds.clone()),
            Box::new(m.consumer_retries_total.clone()),
            Box::new(m.consumer_dead_letter_total.clone()),
            Box::new(m.consumer_lag.clone()),
            Box::new(m.consumer_in_flight.clone()),
            Box::new(m.consumer_handler_down.clone()),
            Box::new(m.consumer_handler_outages_total.clone()),
            Box::new(m.consumer_probe_calls_total.clone()),
            Box::new(m.consumer_batch_size.clone()),
            Box::new(m.consumer_batch_splits_total.clone()),
            Box::new(m.consumer_pending.clone()),
            Box::new(m.consumer_keys_in_retry.clone()),
            Box::new(m.consumer_already_final_total.clone()),
            Box::new(m.consumer_offset_metadata_overflow_total.clone()),
            Box::new(m.consumer_partition_stopped.clone()),
            Box::new(m.consumer_assigned_partitions.clone()),
            Box::new(m.relay_lanes_conflict.clone()),
            Box::new(m.relay_slot_lag_bytes.clone()),
            Box::new(m.task_panics_total.clone()),
            Box::new(m.build_info.clone()),
            Box::new(m.up.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text encoder writes UTF-8")
    }

    /// Sum of the samples of metric `name` whose labels include every `(label, value)`
    /// pair of `filter`, read back from the text exposition.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        sum_in(&self.render(), name, filter)
    }
}

/// The sum of every series of metric `name` in exposition `text` whose labels include all
/// of `filter` (e.g. what `/metrics` of another process answered).
pub fn sum_in(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name
                && filter
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
