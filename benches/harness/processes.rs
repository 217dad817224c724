//! The processes a benchmark runs: the broker (Tansu, or the mock cluster in the harness)
//! and outboxd itself (the release binary), with its metrics and memory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::ClientConfig;

pub fn tansu_binary() -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    [PathBuf::from(&home).join(".cargo/bin/tansu")]
        .into_iter()
        .chain(
            std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .map(|d| Path::new(d).join("tansu")),
        )
        .find(|p| p.exists())
}

/// The broker: Tansu as a process of its own, or the mock cluster in this process.
pub enum Broker {
    Tansu {
        child: Child,
        bootstrap: String,
        _dir: tempfile::TempDir,
    },
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Broker {
    pub fn start(kind: &str) -> Result<Broker> {
        let rtt = BROKER_RTT.get().copied().unwrap_or_default();
        if kind == "mock" {
            let cluster = rdkafka::mocking::MockCluster::new(1)?;
            if !rtt.is_zero() {
                cluster.broker_round_trip_time(-1, rtt)?;
            }
            return Ok(Broker::Mock(cluster));
        }
        if !rtt.is_zero() {
            bail!("--broker-rtt-ms needs --broker mock");
        }
        let bin = tansu_binary()
            .context("tansu not installed (cargo install tansu --locked --features dynostore)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let dir = tempfile::tempdir()?;
        let child = Command::new(bin)
            .current_dir(dir.path())
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let bootstrap = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&bootstrap).is_err() {
            if Instant::now() > deadline {
                bail!("tansu did not listen on {bootstrap}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Broker::Tansu {
            child,
            bootstrap,
            _dir: dir,
        })
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Tansu { bootstrap, .. } => bootstrap.clone(),
            Broker::Mock(m) => m.bootstrap_servers(),
        }
    }

    /// The broker's process, when it runs as one.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Broker::Tansu { child, .. } => Some(child.id()),
            Broker::Mock(_) => None,
        }
    }

    /// librdkafka properties every consumer of this broker gets, the baseline's and
    /// outboxd's alike: `fetch.wait.max.ms`, 1 ms unless `--fetch-wait-ms N` sets it.
    /// Kafka answers a fetch as soon as `fetch.min.bytes` are there. Tansu 0.6.0 answers
    /// every fetch only after sleeping, even when it has data (all of `fetch.wait.max.ms`
    /// below 250 ms, half of it from there), so a consumer's rate follows how much it asks
    /// for per fetch; at 10 ms, outboxd's 1 MiB fetches each paid the sleep. The mock
    /// cluster holds a fetch that found nothing for the whole `fetch.wait.max.ms` and does
    /// not answer early when messages arrive, so at librdkafka's default of 500 ms a
    /// message produced to an idle partition waits up to 500 ms before any consumer sees
    /// it. 1 ms comes closest to Kafka on both.
    pub fn consumer_options(&self) -> Vec<(&'static str, &'static str)> {
        vec![(
            "fetch.wait.max.ms",
            FETCH_WAIT.get().copied().unwrap_or("1"),
        )]
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        match self {
            Broker::Mock(m) => Ok(m.create_topic(topic, partitions, 1)?),
            Broker::Tansu { bootstrap, .. } => {
                use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
                let admin: AdminClient<_> = ClientConfig::new()
                    .set("bootstrap.servers", bootstrap)
                    .create()?;
                let topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
                admin.create_topics([&topic], &AdminOptions::new()).await?;
                Ok(())
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Tansu { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `[kafka.options]` entries every outboxd of this run gets (`--kafka-option key=value`).
static KAFKA_OPTIONS: OnceLock<Vec<(String, String)>> = OnceLock::new();
static BROKER_RTT: OnceLock<Duration> = OnceLock::new();
static FETCH_WAIT: OnceLock<&'static str> = OnceLock::new();

/// Sets `fetch.wait.max.ms` for every consumer in the run; call once, before
/// starting any consumer.
pub fn set_fetch_wait(ms: u32) {
    let ms: &'static str = ms.to_string().leak();
    FETCH_WAIT.set(ms).expect("the fetch wait is set once");
}

/// Sets the round-trip time every mock broker of the run adds to each request; call once,
/// before starting any broker.
pub fn set_broker_rtt(rtt: Duration) {
    BROKER_RTT.set(rtt).expect("the broker RTT is set once");
}

/// Sets the run's extra `[kafka.options]`; call once, before starting any outboxd.
pub fn set_kafka_options(options: Vec<(String, String)>) {
    KAFKA_OPTIONS
        .set(options)
        .expect("kafka options are set once");
}

/// outboxd's `[kafka]` section for `bootstrap`: `options`, then the run's `--kafka-option`s
/// (which win).
pub fn kafka_section(bootstrap: &str, options: &[(&str, &str)]) -> String {
    let mut section = format!("[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.options]\n");
    let extra = KAFKA_OPTIONS.get().map(Vec::as_slice).unwrap_or_default();
    for (key, value) in options {
        if !extra.iter().any(|(k, _)| k == key) {
            section.push_str(&format!("\"{key}\" = \"{value}\"\n"));
        }
    }
    for (key, value) in extra {
        section.push_str(&format!("\"{key}\" = \"{value}\"\n"));
    }
    section
}

/// The release binary, or `$BENCH_OUTBOXD_BIN` (e.g. an older build, for a before/after).
fn outboxd_binary() -> Result<PathBuf> {
    let bin = std::env::var_os("BENCH_OUTBOXD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/outboxd"));
    if !bin.exists() {
        bail!(
            "{} missing: run scripts/bench.sh (it builds the release binary)",
            bin.display()
        );
    }
    Ok(bin)
}

/// An outboxd process and where its metrics are.
pub struct Outboxd {
    child: Child,
    metrics: String,
    /// One client for every scrape: `reqwest::get` builds a new one each time, and with it
    /// loads the system's root certificates, which cost most of a core at 50 scrapes a
    /// second and slowed the outboxd being measured.
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Outboxd {
    pub fn start(config: &str) -> Result<Outboxd> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(
            &path,
            format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"warn\"\n{config}"),
        )?;
        let log = std::fs::File::create(dir.path().join("outboxd.log"))?;
        let child = Command::new(outboxd_binary()?)
            .args(["run", "--config"])
            .arg(&path)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Outboxd {
            child,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            client: reqwest::Client::new(),
            _dir: dir,
        })
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("outboxd.log")).unwrap_or_default()
    }

    /// Peak and current resident set size, in MiB.
    pub fn rss(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (kb("VmHWM:") / 1024.0, kb("VmRSS:") / 1024.0)
    }

    /// The text of outboxd's `/metrics` (empty when it does not answer).
    pub async fn scrape(&self) -> String {
        let Ok(response) = self.client.get(&self.metrics).send().await else {
            return String::new();
        };
        response.text().await.unwrap_or_default()
    }

    /// The sum of every series of metric `name`.
    pub async fn metric(&self, name: &str) -> f64 {
        self.scrape()
            .await
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    /// Reads `metric` every 20 ms until it reaches `target`; returns its rate per second
    /// from the first reading above zero to the last. Fails when outboxd exits or the
    /// metric makes no progress for a minute.
    pub async fn rate_until(&mut self, metric: &str, target: f64) -> Result<f64> {
        let (mut last, mut progressed) = (0.0, Instant::now());
        let mut first = None;
        loop {
            let value = self.metric(metric).await;
            if value > 0.0 && first.is_none() {
                first = Some((Instant::now(), value));
            }
            if value >= target {
                break;
            }
            if value > last {
                (last, progressed) = (value, Instant::now());
            }
            if progressed.elapsed() > Duration::from_secs(60) || self.exited() {
                bail!("{metric} stalled at {value} of {target}: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (start, at_start) = first.with_context(|| format!("{metric} never rose above zero"))?;
        Ok((target - at_start) / start.elapsed().as_secs_f64())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Outboxd {
    /// A harness that fails part-way must not leave outboxd running.
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU seconds (user + system) a process has used so far, 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds used so far by the PostgreSQL backends serving TCP or socket clients on
/// this machine (not the checkpointer, WAL writer or autovacuum, whose work after a fill
/// would blur the comparison). A backend's seconds vanish with it: read before clients go.
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("postgres: ") && (c.contains("127.0.0.1(") || c.contains("[local]"))
            })
        })
        .map(cpu_seconds)
        .sum()
}
