//! Integration tests: real PostgreSQL (DATABASE_URL, default 127.0.0.1:5432/test) and a
//! real Kafka protocol endpoint (librdkafka's mock cluster on localhost sockets).

mod consumer_helpers;
mod helpers;

mod cli;
mod config;
mod consumer_delivery;
mod consumer_faults;
mod consumer_handlers;
mod faults;
mod faults_infra;
mod ops;
mod relay_delivery;
mod relay_faults;
mod relay_lanes;
mod relay_modes;
