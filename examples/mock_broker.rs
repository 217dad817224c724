//! librdkafka's mock cluster as a process of its own, for tests that freeze (SIGSTOP) or
//! kill the broker: `mock_broker TOPIC:PARTITIONS...` creates the topics, prints the
//! bootstrap address on stdout, then serves until killed. Not durable; tests only.

use std::io::Write;

use rdkafka::mocking::MockCluster;

fn main() {
    let cluster = MockCluster::new(1).expect("mock cluster starts");
    for arg in std::env::args().skip(1) {
        let (topic, partitions) = arg.split_once(':').unwrap_or((&arg, "1"));
        let partitions: i32 = partitions.parse().expect("TOPIC:PARTITIONS");
        cluster
            .create_topic(topic, partitions, 1)
            .expect("topic created");
    }
    println!("{}", cluster.bootstrap_servers());
    std::io::stdout().flush().expect("stdout");
    loop {
        std::thread::park();
    }
}
