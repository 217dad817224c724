//! The stream: transactions of the slot in commit order, their inserts into the table as
//! rows, published in batches; the slot confirms a transaction once every row of it and
//! of every transaction before it was acknowledged (or recorded as dead).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use super::deliver::{Batch, Deliverer, Origin};
use super::pgoutput::{self, Change};
use super::rows::{self, RowReader};
use super::{WalError, Watch};
use crate::systemd::Heartbeat;

/// How often the stream's loop shows it is alive and measures the slot's lag while no
/// event arrives.
const TICK: Duration = Duration::from_secs(1);

/// What the stream loop needs besides the session.
pub struct Stream<'a> {
    /// Publishing.
    pub deliverer: &'a mut Deliverer,
    /// The loop's liveness.
    pub heartbeat: &'a Heartbeat,
    /// Stops the loop; rows read and not yet acknowledged are then not confirmed.
    pub stop: &'a CancellationToken,
    /// Checked on each tick (leadership, slot lag); an error ends the stream.
    pub watch: &'a mut Watch,
}

/// Relations of the stream: the table's, with its reader, and the others (skipped).
#[derive(Default)]
struct Relations {
    ours: HashMap<u32, Arc<RowReader>>,
    others: HashSet<u32>,
}

/// Reads `client` until stopped or failed; returns the last position confirmed.
pub async fn run(client: &mut ReplicationClient, s: Stream<'_>) -> Result<Option<Lsn>, WalError> {
    let Stream {
        deliverer,
        heartbeat,
        stop,
        watch,
    } = s;
    let (schema, table) = {
        let t = &deliverer.config.table;
        let (s, n) = t.split_once('.').unwrap_or(("public", t));
        (s.to_owned(), n.to_owned())
    };
    let inserts = deliverer.config.wal.inserts;
    let prefix = deliverer.config.wal.message_prefix.clone();
    let mut relations = Relations::default();
    let mut batch = Batch::default();
    // The end of the last transaction whose rows are all in `batch` or published.
    let mut commit: Option<Lsn> = None;
    let mut confirmed: Option<Lsn> = None;
    // How many rows of `batch` belong to transactions that committed.
    let mut committed = 0;
    let mut in_transaction = false;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = if batch.is_empty() || in_transaction {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    heartbeat.beat();
                    watch.tick().await?;
                    continue;
                }
                event = client.recv() => event,
            }
        } else {
            // Whole transactions wait in the batch: take what already arrived, and
            // publish once nothing more is there.
            match client.recv().now_or_never() {
                Some(event) => event,
                None => {
                    deliverer.deliver(&mut batch, stop).await?;
                    committed = 0;
                    heartbeat.beat();
                    if let Some(end) = commit {
                        confirm(client, &mut confirmed, end);
                    }
                    watch.tick().await?;
                    continue;
                }
            }
        };
        let Some(event) = event? else {
            return Err(WalError::StreamEnded);
        };
        match event {
            ReplicationEvent::Begin { .. } => in_transaction = true,
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data)? {
                Change::Relation(r) => {
                    relations.ours.remove(&r.id);
                    relations.others.remove(&r.id);
                    if inserts && r.schema == schema && r.name == table {
                        let reader = RowReader::new(&r, &deliverer.config)?;
                        relations.ours.insert(r.id, Arc::new(reader));
                    } else {
                        relations.others.insert(r.id);
                    }
                }
                Change::Insert { relation, values } => {
                    let Some(reader) = relations.ours.get(&relation) else {
                        if relations.others.contains(&relation) {
                            continue;
                        }
                        return Err(WalError::Protocol(format!(
                            "an insert into relation {relation}, which the stream did not describe"
                        )));
                    };
                    let row = reader.read(&values);
                    let (reader, data) = (reader.clone(), data.clone());
                    batch.push(
                        row,
                        Origin::Tuple(Box::new(move || match pgoutput::decode(&data) {
                            Ok(Change::Insert { values, .. }) => reader.row_data(&values),
                            _ => serde_json::Value::Null,
                        })),
                    );
                    if batch.len() >= deliverer.batch_size() {
                        deliverer.deliver(&mut batch, stop).await?;
                        committed = 0;
                        heartbeat.beat();
                        if let Some(end) = commit {
                            confirm(client, &mut confirmed, end);
                        }
                    }
                }
                Change::Other => {}
            },
            ReplicationEvent::Commit { end_lsn, .. } => {
                in_transaction = false;
                commit = Some(end_lsn);
                committed = batch.len();
                if batch.is_empty() {
                    confirm(client, &mut confirmed, end_lsn);
                    continue;
                }
                if batch.len() >= deliverer.batch_size() {
                    deliverer.deliver(&mut batch, stop).await?;
                    committed = 0;
                    heartbeat.beat();
                    confirm(client, &mut confirmed, end_lsn);
                    watch.tick().await?;
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if !in_transaction && batch.is_empty() {
                    // Everything the server sent up to here is published: nothing the
                    // slot holds before `wal_end` is still needed.
                    confirm(client, &mut confirmed, wal_end);
                }
            }
            ReplicationEvent::Message {
                transactional: false,
                prefix: p,
                lsn,
                ..
            } if prefix.as_deref() == Some(p.as_str()) => {
                // Written whether its transaction commits or not: no outbox event.
                tracing::warn!(prefix = %p, %lsn, "a logical decoding message under the prefix was emitted with transactional = false; not relayed");
            }
            ReplicationEvent::Message {
                prefix: p,
                content,
                lsn,
                ..
            } if prefix.as_deref() == Some(p.as_str()) => {
                let (row, kept) = rows::message_row(&deliverer.config, &content, lsn.as_u64());
                batch.push(row, Origin::Row(kept));
                if batch.len() >= deliverer.batch_size() {
                    deliverer.deliver(&mut batch, stop).await?;
                    committed = 0;
                    heartbeat.beat();
                    if let Some(end) = commit {
                        confirm(client, &mut confirmed, end);
                    }
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
    }
    // Stopped: publish the rows of whole transactions, within the grace, and confirm the
    // last; the rows of one still arriving come again after a restart.
    batch.truncate(committed);
    if let (false, Some(end)) = (batch.is_empty(), commit) {
        if deliverer.deliver(&mut batch, stop).await.is_ok() {
            confirm(client, &mut confirmed, end);
        }
    }
    Ok(confirmed)
}

/// Raises the position the session reports to the server.
fn confirm(client: &ReplicationClient, confirmed: &mut Option<Lsn>, lsn: Lsn) {
    if confirmed.is_none_or(|c| lsn > c) {
        client.update_applied_lsn(lsn);
        *confirmed = Some(lsn);
    }
}
