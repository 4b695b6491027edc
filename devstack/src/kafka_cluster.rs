//! A private Apache Kafka cluster for one test — for tests that freeze,
//! kill or restart brokers, which they cannot do to the shared test broker.
//!
//! ```text
//!   KafkaCluster::start(n)   n = 1 or 3 KRaft nodes (each broker + controller), free ports,
//!                            all formatted and started in parallel; ready when every broker
//!                            is registered and unfenced
//!   .freeze(id) / .thaw(id)  SIGSTOP / SIGCONT: connections stay open, nothing is answered
//!   .kill9(id)               SIGKILL: no controlled shutdown
//!   .stop(id)                SIGTERM: controlled shutdown (leaderships move first)
//!   .restart(id)             the node again, on the same data and ports; waits until it is back
//!   .leader_of(topic, p)     from metadata; .wait_in_sync(): every replica back in its ISR
//!   drop                     every node SIGKILLed, data directory removed (logs kept;
//!                            the data too with KAFKA_CLUSTER_KEEP_DATA=1, for a post-mortem)
//! ```
//!
//! What it owns: the nodes' configuration (one node: replication 1
//! everywhere, as `scripts/lib/stack.sh` runs the stack's broker; three
//! nodes: static voters `1@…,2@…,3@…`, default replication 3,
//! `min.insync.replicas=2`, no unclean leader election, internal topics at
//! replication 3 / min ISR 2, and a broker session of 3 s so a killed broker
//! is fenced fast), the JVM processes, and their data directory under the
//! temp directory. Node ids are Kafka's broker ids, `1..=n`.
//!
//! The jars come from `TEST_KAFKA_LIBS`, the log4j2 configuration from
//! `TEST_KAFKA_LOG4J` (both exported by `scripts/test` and `scripts/chaos`),
//! `java` from `PATH`. Each node logs to `<temp>/kafkacluster_…logs/node-N.log`;
//! that directory is kept, named in every error and printed when the
//! cluster is dropped during a panic. The JVMs stay in the test's process
//! group, so nextest's timeout (which signals the group) ends them too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;
use rdkafka::ClientConfig;

use crate::testing::unique_name;

/// Broker heap: three nodes and the test fit on a small machine.
const HEAP: &str = "384m";
/// How long a starting node may take to register (a node takes about 7 s
/// alone; three at once on two busy cores, several times that).
const START_TIMEOUT: Duration = Duration::from_secs(120);

struct Node {
    id: i32,
    port: u16,
    controller_port: u16,
    config: PathBuf,
    log: PathBuf,
    /// `None` once killed or stopped (and reaped).
    child: Mutex<Option<Child>>,
}

/// A running private cluster; killed and its data deleted on drop.
pub struct KafkaCluster {
    data: PathBuf,
    logs: PathBuf,
    libs: String,
    log4j: String,
    nodes: Vec<Node>,
}

impl KafkaCluster {
    /// Formats and starts `nodes` (1 or 3) KRaft nodes in parallel and waits
    /// until every broker is registered and unfenced.
    pub async fn start(nodes: usize) -> anyhow::Result<KafkaCluster> {
        if nodes != 1 && nodes != 3 {
            bail!("a private Kafka cluster has 1 or 3 nodes, not {nodes}");
        }
        let libs = std::env::var("TEST_KAFKA_LIBS").context(
            "TEST_KAFKA_LIBS is not set (scripts/test exports it: the Kafka jar directory)",
        )?;
        let log4j = std::env::var("TEST_KAFKA_LOG4J").context(
            "TEST_KAFKA_LOG4J is not set (scripts/test exports it: kafka/log4j2.properties)",
        )?;
        if !Path::new(&libs).is_dir() {
            bail!("TEST_KAFKA_LIBS={libs} is not a directory");
        }
        let name = unique_name("kafkacluster");
        let data = std::env::temp_dir().join(&name);
        let logs = std::env::temp_dir().join(format!("{name}.logs"));
        std::fs::create_dir_all(&data)?;
        std::fs::create_dir_all(&logs)?;
        let mut ports = Vec::new();
        let mut listeners = Vec::new();
        for _ in 0..nodes * 2 {
            // Held until every port is chosen, so no two are the same.
            let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
            ports.push(l.local_addr()?.port());
            listeners.push(l);
        }
        drop(listeners);
        let mut cluster = KafkaCluster {
            data,
            logs,
            libs,
            log4j,
            nodes: Vec::new(),
        };
        for i in 0..nodes {
            let id = i as i32 + 1;
            cluster.nodes.push(Node {
                id,
                port: ports[2 * i],
                controller_port: ports[2 * i + 1],
                config: cluster.data.join(format!("node-{id}.properties")),
                log: cluster.logs.join(format!("node-{id}.log")),
                child: Mutex::new(None),
            });
        }
        for node in &cluster.nodes {
            std::fs::write(&node.config, cluster.config(node))
                .with_context(|| format!("writing {}", node.config.display()))?;
        }
        cluster.format().await?;
        for node in &cluster.nodes {
            cluster.spawn(node)?;
        }
        let ids: Vec<i32> = cluster.nodes.iter().map(|n| n.id).collect();
        cluster
            .wait_registered(&ids, START_TIMEOUT)
            .await
            .context("starting the private Kafka cluster")?;
        Ok(cluster)
    }

    /// Every node's client listener, comma-separated.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Node ids, `1..=n`.
    pub fn node_ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Where the nodes' logs are (kept after drop).
    pub fn log_dir(&self) -> &Path {
        &self.logs
    }

    /// SIGSTOP node `id`: connections stay open, nothing is answered.
    pub fn freeze(&self, id: i32) -> anyhow::Result<()> {
        self.signal(id, "-STOP")
    }

    /// SIGCONT node `id`.
    pub fn thaw(&self, id: i32) -> anyhow::Result<()> {
        self.signal(id, "-CONT")
    }

    /// SIGKILL node `id` (no controlled shutdown) and reap it.
    pub fn kill9(&self, id: i32) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let mut guard = node.child.lock().unwrap();
        let mut child = guard
            .take()
            .with_context(|| format!("Kafka node {id} is not running"))?;
        child.kill()?;
        child.wait()?;
        log_marker(&node.log, "killed with SIGKILL");
        Ok(())
    }

    /// SIGTERM node `id` and wait for its controlled shutdown (SIGKILL
    /// after a minute).
    pub async fn stop(&self, id: i32) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let mut child = node
            .child
            .lock()
            .unwrap()
            .take()
            .with_context(|| format!("Kafka node {id} is not running"))?;
        signal_pid(child.id(), "-CONT")?;
        signal_pid(child.id(), "-TERM")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait()? {
                log_marker(&node.log, &format!("stopped with SIGTERM: {status}"));
                return Ok(());
            }
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                bail!(
                    "Kafka node {id} did not stop within 60 s of SIGTERM; killed (logs: {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts node `id` again (after `kill9` or `stop`) on the same data and
    /// ports, and waits until it is registered and unfenced.
    pub async fn restart(&self, id: i32) -> anyhow::Result<()> {
        let node = self.node(id)?;
        if node.child.lock().unwrap().is_some() {
            bail!("Kafka node {id} is still running");
        }
        self.spawn(node)?;
        self.wait_registered(&[id], START_TIMEOUT)
            .await
            .with_context(|| format!("restarting Kafka node {id}"))
    }

    /// The broker leading `topic`/`partition`, if it has one now.
    pub async fn leader_of(&self, topic: &str, partition: i32) -> anyhow::Result<Option<i32>> {
        let md = self.metadata(Some(topic)).await?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
            .map(|p| p.leader())
            .filter(|&l| l >= 0))
    }

    /// Waits until every partition of every topic (internal ones included)
    /// has a leader and all its replicas in sync.
    pub async fn wait_in_sync(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let behind = match self.metadata(None).await {
                Ok(md) => {
                    let behind = md
                        .topics()
                        .iter()
                        .flat_map(|t| {
                            t.partitions()
                                .iter()
                                .filter(|p| p.leader() < 0 || p.isr().len() < p.replicas().len())
                                .map(move |p| {
                                    format!(
                                        "{}/{} leader {} isr {:?} replicas {:?}",
                                        t.name(),
                                        p.id(),
                                        p.leader(),
                                        p.isr(),
                                        p.replicas()
                                    )
                                })
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
                    if behind.is_empty() {
                        return Ok(());
                    }
                    behind
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "replicas not in sync after {timeout:?}: {behind} (logs: {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Cluster metadata (one topic or all), from whichever node answers.
    pub async fn metadata(&self, topic: Option<&str>) -> anyhow::Result<Metadata> {
        metadata_from(self.bootstrap(), topic).await
    }

    fn node(&self, id: i32) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no Kafka node {id} in this cluster"))
    }

    fn config(&self, node: &Node) -> String {
        let n = self.nodes.len();
        let voters = self
            .nodes
            .iter()
            .map(|v| format!("{}@127.0.0.1:{}", v.id, v.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let (rf, min_isr) = if n == 1 { (1, 1) } else { (3, 2) };
        // One node: a dynamic quorum of one (formatted --standalone), as the
        // stack runs; three: static voters (formatted without it).
        let quorum = if n == 1 {
            format!(
                "controller.quorum.bootstrap.servers=127.0.0.1:{}",
                node.controller_port
            )
        } else {
            format!(
                "controller.quorum.voters={voters}\n\
                 unclean.leader.election.enable=false\n\
                 broker.session.timeout.ms=3000\n\
                 broker.heartbeat.interval.ms=500"
            )
        };
        format!(
            "process.roles=broker,controller\n\
             node.id={id}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             {quorum}\n\
             log.dirs={dir}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             default.replication.factor={rf}\n\
             min.insync.replicas={min_isr}\n\
             offsets.topic.replication.factor={rf}\n\
             offsets.topic.num.partitions=5\n\
             transaction.state.log.replication.factor={rf}\n\
             transaction.state.log.min.isr={min_isr}\n\
             transaction.state.log.num.partitions=5\n\
             share.coordinator.state.topic.replication.factor={rf}\n\
             share.coordinator.state.topic.min.isr={min_isr}\n\
             group.initial.rebalance.delay.ms=0\n",
            id = node.id,
            port = node.port,
            cport = node.controller_port,
            dir = self.data.join(format!("node-{}", node.id)).display(),
        )
    }

    /// `java` with the jars and logging. The client compiler only and the
    /// serial collector: a node starts in half the time (measured 3.5–8.5 s
    /// against 14–17 s with C2 and G1 on two busy cores), and a test's load
    /// does not need C2. `tool`: a short-lived tool, smaller heap.
    fn java(&self, tool: bool) -> Command {
        let mut c = Command::new("java");
        c.args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]);
        c.arg(if tool {
            "-Xmx128m".to_owned()
        } else {
            format!("-Xmx{HEAP}")
        });
        c.arg("-Djava.awt.headless=true")
            .arg(format!("-Dlog4j2.configurationFile={}", self.log4j))
            .arg("-cp")
            .arg(format!("{}/*", self.libs))
            .stdin(Stdio::null());
        c
    }

    /// `StorageTool format` for every node at once (one cluster id).
    async fn format(&self) -> anyhow::Result<()> {
        let cluster_id = random_cluster_id();
        let mut running = Vec::new();
        for node in &self.nodes {
            let log = std::fs::File::create(self.logs.join(format!("format-{}.log", node.id)))?;
            let mut cmd = tokio::process::Command::from(self.java(true));
            cmd.args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
                .arg(&node.config);
            if self.nodes.len() == 1 {
                cmd.arg("--standalone");
            }
            let child = cmd
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("running java (is a Java runtime on PATH?)")?;
            running.push((node.id, child));
        }
        for (id, mut child) in running {
            let status = child.wait().await?;
            if !status.success() {
                bail!(
                    "formatting Kafka node {id} failed ({status}); see {}",
                    self.logs.join(format!("format-{id}.log")).display()
                );
            }
        }
        Ok(())
    }

    fn spawn(&self, node: &Node) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        log_marker(&node.log, "starting");
        let child = self
            .java(false)
            .arg("kafka.Kafka")
            .arg(&node.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting java (is a Java runtime on PATH?)")?;
        *node.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// Waits until brokers `ids` are in the metadata (registered, not
    /// fenced); fails early when one of their processes exits.
    async fn wait_registered(&self, ids: &[i32], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            for &id in ids {
                let node = self.node(id)?;
                let mut guard = node.child.lock().unwrap();
                if let Some(child) = guard.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        *guard = None;
                        bail!(
                            "Kafka node {id} exited during start-up ({status}); see {}",
                            node.log.display()
                        );
                    }
                }
            }
            // Asked on its own port: a node opens its client listener only
            // once it is unfenced, and a killed node may still be listed by
            // the others until its session expires.
            let mut all = true;
            for &id in ids {
                let node = self.node(id)?;
                let up = match metadata_from(format!("127.0.0.1:{}", node.port), None).await {
                    Ok(md) => {
                        let listed: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
                        ids.iter().all(|i| listed.contains(i))
                    }
                    Err(_) => false,
                };
                all &= up;
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "Kafka nodes {ids:?} not registered within {timeout:?} (logs: {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn signal(&self, id: i32, sig: &str) -> anyhow::Result<()> {
        let node = self.node(id)?;
        let guard = node.child.lock().unwrap();
        let child = guard
            .as_ref()
            .with_context(|| format!("Kafka node {id} is not running"))?;
        log_marker(&node.log, &format!("signal {sig}"));
        signal_pid(child.id(), sig)
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Some(mut child) = node.child.lock().unwrap().take() {
                // SIGKILL ends a stopped (frozen) process too.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::env::var_os("KAFKA_CLUSTER_KEEP_DATA").is_some() {
            eprintln!("private Kafka cluster data kept: {}", self.data.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.data);
        }
        if std::thread::panicking() {
            eprintln!("private Kafka cluster logs: {}", self.logs.display());
        }
    }
}

async fn metadata_from(bootstrap: String, topic: Option<&str>) -> anyhow::Result<Metadata> {
    let topic = topic.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .context("creating Kafka client")?;
        c.fetch_metadata(topic.as_deref(), Duration::from_secs(3))
            .with_context(|| format!("fetching metadata from {bootstrap}"))
    })
    .await?
}

fn signal_pid(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill {sig} {pid} failed");
    }
    Ok(())
}

/// A marker line in a node's log, so restarts and stops are visible there.
fn log_marker(log: &Path, what: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S%.3f");
        let _ = writeln!(f, "[{now}] ---- test: node {what} ----");
    }
}

/// A KRaft cluster id: 16 random bytes, URL-safe base64 without padding,
/// never starting with `-` (StorageTool would take it for an option, one
/// time in 64; Kafka's own generator skips those ids too).
fn random_cluster_id() -> String {
    loop {
        let id = random_base64_id();
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn random_base64_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 16];
    for chunk in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write(unique_name("id").as_bytes());
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    let mut out = String::new();
    let mut bits = 0u32;
    let mut acc = 0u32;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids_are_22_base64url_characters_never_starting_with_a_dash() {
        // 1 id in 64 would start with '-' without the check: 10,000 ids
        // miss it with probability (63/64)^10000, about 1e-68.
        for _ in 0..10_000 {
            let id = random_cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'), "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
        }
    }
}
