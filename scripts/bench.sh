#!/usr/bin/env bash
# The benchmark command: builds the release binary, then runs the harness
# (benches/harness/main.rs). Arguments go to the harness:
#   --write            also write BENCHMARKS.md (the part above "## Notes") and its charts
#                      (docs/bench-*.svg)
#   --broker tansu|mock  Tansu as a separate process (default when `tansu` is installed:
#                      cargo install tansu --locked --features dynostore) or the mock cluster
#   --rows N           relay backlog rows (default 300000)
#   --messages N       consumer messages (default 500000 with Tansu, 100000 with the mock,
#                      which keeps only 5 MiB per partition)
#   --only relay,latency,dispatch,slow   a subset of the scenarios (slow: the consumer
#                      against a 10 ms endpoint, key order against partition order);
#                      `store` (only when named) relays the seed's event store in cursor
#                      mode at 100,000 and 2,000,000 rows, three rounds; `sqlbatch`
#                      (only when named) builds a read model through the sql handler,
#                      batched against one transaction per event and a bare client
#   --handlers log,http,http-batch,sql   a subset of the dispatch handlers (http-batch:
#                      the http handler with batch_size = 100)
#   --drains 1,1-noprefetch,4   a subset of the relay drains (lanes 1, lanes 1 without
#                      prefetch, lanes 4)
#   --loads 1000x1,1000x10,10000x1-poll   a subset of the latency loads (rows/s x rows
#                      per transaction, `-poll` without LISTEN)
#   --latency-secs N   length of each latency run (default 30)
#   --batch-size N     batch_size of the relay drains (default: outboxd's, 1000)
#   --kafka-option key=value   a librdkafka property for every outboxd (repeatable)
#   --broker-rtt-ms N  the mock broker answers each request N ms late (a remote cluster)
#   --fetch-wait-ms N  fetch.wait.max.ms of every consumer, baselines and outboxd alike
#                      (default 1; Tansu 0.6.0 waits that long before answering any fetch,
#                      even one it has data for, and the mock cluster before answering an
#                      empty one, even when messages arrive meanwhile)
#   --db-rtt-ms N      the relay drains and their raw claims reach PostgreSQL through a
#                      proxy that holds each request N ms (a database on another host)
# $BENCH_OUTBOXD_BIN runs another outboxd binary (an older build, for a before/after).
# PostgreSQL: $DATABASE_URL, default postgres://postgres@127.0.0.1:5432/test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
cargo bench --locked --bench harness -- "$@"
