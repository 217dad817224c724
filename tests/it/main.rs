//! Integration tests: real PostgreSQL (DATABASE_URL, default 127.0.0.1:5432/test), real
//! MariaDB/MySQL (MYSQL_URL, default root@127.0.0.1:3306/test), SQLite files, and a real
//! Kafka protocol endpoint (librdkafka's mock cluster on localhost sockets).

mod backends;
mod consumer_helpers;
mod helpers;
mod key_server;

mod cli;
mod cli_backends;
mod config;
mod consumer_backpressure;
mod consumer_command;
mod consumer_delivery;
mod consumer_faults;
mod consumer_handlers;
mod consumer_http_batch;
mod consumer_keys;
mod consumer_outage;
mod consumer_reset;
mod consumer_sql;
mod consumer_sql_batch;
mod dlq;
mod docs;
mod faults;
mod faults_infra;
mod layout;
mod ops;
mod preflight;
mod quickstart;
mod relay_backends;
mod relay_bad_rows;
mod relay_claims;
mod relay_delivery;
mod relay_faults;
mod relay_lane_identity;
mod relay_pipeline;
mod relay_shutdown;
mod relay_tables;
mod relay_wal;
mod relay_wal_faults;
mod supervision;
