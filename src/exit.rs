//! What kind of failure an error is, which decides the exit code.

/// What kind of failure an error is; the exit code follows from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// The configuration is unusable: restarting with it will not help.
    Config,
    /// A command-line argument is unusable.
    Usage,
    /// A service the configuration names (the database, the brokers) does not answer:
    /// trying again later may succeed.
    Unavailable,
    /// A part of the daemon that cannot be restarted on its own (a relay table's lane
    /// manager, the consumer, the operations endpoint) ended or panicked: a bug, exit code
    /// 70 (EX_SOFTWARE), so that systemd or Kubernetes restart the process.
    Software,
    /// Anything else: the environment (database, Kafka, the network) or a bug.
    Failure,
}
