//! Per-test isolation on the test stack that `scripts/test` starts.
//!
//! Every test gets its own database (cloned from the migrated template
//! `TEST_TEMPLATE_DB`), so it has its own `orders`, `outbox` and
//! `outbox_pub`; a slot name derived from that database (slots are
//! cluster-wide); and its own topic. Tests therefore run in parallel without
//! sharing state.
//!
//! The stack is found through the variables `scripts/test` exports (and
//! writes to `.run/test/env`): `TEST_DATABASE_URL` (a superuser URL),
//! `TEST_TEMPLATE_DB` and `TEST_KAFKA_BOOTSTRAP_SERVERS`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the test stack. Run `scripts/test`, or \
             `scripts/test --stack-only` and then `source .run/test/env` before `cargo nextest run`"
        )
    })
}

/// Superuser URL of the test cluster's maintenance database.
pub fn admin_url() -> String {
    env("TEST_DATABASE_URL")
}

/// The CA that signed the test cluster's TLS certificate (SAN 127.0.0.1 and
/// localhost), for `sslmode=verify-full&sslrootcert=…`.
pub fn pg_ca() -> String {
    env("TEST_PG_CA")
}

/// `url` (a test database's) with TLS required and the server's certificate
/// checked against [`pg_ca`], name included.
pub fn verify_full_url(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}sslmode=verify-full&sslrootcert={}", pg_ca())
}

/// Bootstrap servers of the test broker.
pub fn kafka_bootstrap() -> String {
    env("TEST_KAFKA_BOOTSTRAP_SERVERS")
}

/// A name unique across test processes and within one: `prefix_<hex>`.
/// Lower-case, so it is valid unquoted as a database, slot or topic name.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{:x}_{nanos:x}_{n}", std::process::id())
}

/// Connects (pgconn: TLS as the URL's sslmode says) and drives the
/// connection in the background.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let params = pgconn::ConnectParams::from_url(url)
        .with_context(|| format!("connection settings of {}", redact(url)))?
        .or_application_name("devstack");
    pgconn::connect(&params)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))
}

/// `url` with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url.parse::<Config>() {
        Ok(cfg) => format!(
            "postgres://{}@{:?}/{}",
            cfg.get_user().unwrap_or(""),
            cfg.get_hosts().first(),
            cfg.get_dbname().unwrap_or("")
        ),
        Err(_) => "<unparseable database url>".to_owned(),
    }
}

/// `base` with the database name replaced by `dbname`.
pub fn url_for_database(base: &str, dbname: &str) -> String {
    match base.rsplit_once('/') {
        Some((head, tail)) => {
            let query = tail
                .split_once('?')
                .map(|(_, q)| format!("?{q}"))
                .unwrap_or_default();
            format!("{head}/{dbname}{query}")
        }
        None => format!("{base}/{dbname}"),
    }
}

/// A fresh database with the migrated schema, private to one test.
pub struct TestDb {
    pub name: String,
    /// Superuser URL of this database.
    pub url: String,
}

impl TestDb {
    /// Creates the database from the migrated template and applies any
    /// migration newer than the template.
    pub async fn create() -> anyhow::Result<TestDb> {
        let admin = connect(&admin_url()).await?;
        let name = unique_name("t");
        let template = env("TEST_TEMPLATE_DB");
        // CREATE DATABASE .. TEMPLATE fails while another session is in the
        // template; other tests only ever connect to their own clones, but
        // retry briefly in case two creations overlap.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match admin
                .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .await
            {
                Ok(()) => break,
                Err(e)
                    if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("creating test database"),
            }
        }
        let url = url_for_database(&admin_url(), &name);
        // The template was migrated when the test stack started; migrations
        // added since (this binary embeds them) are applied on the clone.
        crate::migrations::apply(&url)
            .await
            .context("migrating test database")?;
        Ok(TestDb { url, name })
    }

    /// A slot name private to this database.
    pub fn slot_name(&self) -> String {
        format!("slot_{}", self.name)
    }

    /// A normal SQL connection to this database.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }
}

/// A binary of this workspace built beside the running test
/// (`target/<profile>/<name>`), for a crate's tests that run another
/// crate's binary: Cargo sets `CARGO_BIN_EXE_<name>` only for the crate's
/// own. `cargo nextest run --workspace` (scripts/test) builds them all.
pub fn workspace_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .context("the test binary is not under target/<profile>/deps")?;
    let bin = dir.join(name);
    anyhow::ensure!(
        bin.is_file(),
        "{} is not built: run cargo build --bin {name} first (scripts/test builds every binary)",
        bin.display()
    );
    Ok(bin)
}

/// Creates a topic with a unique name and returns the name.
pub async fn create_topic(partitions: i32) -> anyhow::Result<String> {
    let name = unique_name("topic");
    crate::kafka::create_topic(&kafka_bootstrap(), &name, partitions).await?;
    Ok(name)
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The test broker's SASL_SSL listener (SCRAM-SHA-512 over TLS, ACLs
/// enforced) and the SCRAM users of the relay and the notifier, from what
/// `scripts/test` exports: `TEST_KAFKA_SASL_BOOTSTRAP`, `TEST_KAFKA_CA` (the
/// CA certificate that signed the broker's), `TEST_KAFKA_RELAY_USER` and
/// `TEST_KAFKA_RELAY_PASSWORD`, `TEST_KAFKA_NOTIFIER_USER` and
/// `TEST_KAFKA_NOTIFIER_PASSWORD`, and `TEST_KAFKA_ACL_PREFIX`: the ACLs
/// grant both users topics and groups (the relay also transactional ids
/// `outbox-relay.<prefix>…`) whose names start with it, and nothing else.
#[derive(Clone, Debug)]
pub struct KafkaSasl {
    pub bootstrap: String,
    pub ca: String,
    pub relay_user: String,
    pub relay_password: String,
    pub notifier_user: String,
    pub notifier_password: String,
    pub acl_prefix: String,
}

impl KafkaSasl {
    pub fn from_env() -> KafkaSasl {
        KafkaSasl {
            bootstrap: env("TEST_KAFKA_SASL_BOOTSTRAP"),
            ca: env("TEST_KAFKA_CA"),
            relay_user: env("TEST_KAFKA_RELAY_USER"),
            relay_password: env("TEST_KAFKA_RELAY_PASSWORD"),
            notifier_user: env("TEST_KAFKA_NOTIFIER_USER"),
            notifier_password: env("TEST_KAFKA_NOTIFIER_PASSWORD"),
            acl_prefix: env("TEST_KAFKA_ACL_PREFIX"),
        }
    }

    /// The `--kafka-property` options of a client logging in as `user`
    /// with `password`, as a user of the relay or the notifier writes them.
    pub fn properties(&self, user: &str, password: &str) -> Vec<String> {
        [
            "security.protocol=SASL_SSL".to_owned(),
            "sasl.mechanism=SCRAM-SHA-512".to_owned(),
            format!("sasl.username={user}"),
            format!("sasl.password={password}"),
            format!("ssl.ca.location={}", self.ca),
        ]
        .into_iter()
        .flat_map(|p| ["--kafka-property".to_owned(), p])
        .collect()
    }

    /// The same login in a properties file (mode 600, in a fresh temporary
    /// directory): the `--kafka-properties-file` option naming it.
    pub fn properties_file(&self, user: &str, password: &str) -> std::io::Result<Vec<String>> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(unique_name("kafka_props"));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("client.properties");
        let text = format!(
            "# {user} over SASL_SSL\nsecurity.protocol=SASL_SSL\nsasl.mechanism=SCRAM-SHA-512\n\
             sasl.username={user}\nsasl.password={password}\nssl.ca.location={}\n",
            self.ca
        );
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        Ok(vec![
            "--kafka-properties-file".to_owned(),
            path.display().to_string(),
        ])
    }

    /// A unique name that the test ACLs grant (topic, group, slot).
    pub fn granted_name(&self, prefix: &str) -> String {
        format!("{}{}", self.acl_prefix, unique_name(prefix))
    }

    /// The Kafka users' passwords.
    pub fn kafka_secrets(&self) -> Vec<String> {
        vec![self.relay_password.clone(), self.notifier_password.clone()]
    }

    /// Every secret of the stack a log line or an HTTP answer must not show.
    pub fn secrets(&self) -> Vec<String> {
        let mut secrets = vec![self.relay_password.clone(), self.notifier_password.clone()];
        if let Ok(cfg) = admin_url().parse::<Config>() {
            if let Some(pw) = cfg.get_password() {
                secrets.push(String::from_utf8_lossy(pw).into_owned());
            }
        }
        secrets
    }
}

/// A CA certificate of its own (made with openssl in a fresh temporary
/// directory), which did not sign the test broker's certificate.
pub fn another_ca() -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(unique_name("other_ca"));
    std::fs::create_dir_all(&dir)?;
    let (key, crt) = (dir.join("ca.key"), dir.join("ca.crt"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the stack CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl req failed: {status}");
    Ok(crt.display().to_string())
}

/// Fails when the command line of process `pid` (as `ps` shows it to every
/// local user) holds one of `secrets`.
pub fn assert_no_secret_in_command_line(pid: u32, secrets: &[String]) -> anyhow::Result<()> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    anyhow::ensure!(
        !cmdline.trim().is_empty(),
        "process {pid} has no command line"
    );
    assert_no_secret("the process list", &cmdline, secrets);
    Ok(())
}

/// A binary under test as a child process, its stderr (the logs) kept.
pub struct Captured {
    pub child: tokio::process::Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Captured {
    /// Spawns `cmd` with stdin closed, stdout discarded and stderr captured.
    pub fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<Captured> {
        use tokio::io::AsyncBufReadExt;
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the binary under test")?;
        let pipe = child.stderr.take().context("stderr is piped")?;
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let reader = tokio::spawn({
            let stderr = stderr.clone();
            async move {
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut s = stderr.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Ok(Captured {
            child,
            stderr,
            reader,
        })
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for the process to exit by itself; its status
    /// and all of its stderr.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => anyhow::bail!(
                "still running after {timeout:?}; its log:\n{}",
                self.stderr()
            ),
        };
        // The pipe ends with the process: read to its end.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        Ok((status, self.stderr()))
    }

    /// SIGTERM, then [`Captured::wait_exit`].
    pub async fn terminate(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let pid = self.child.id().context("already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
        self.wait_exit(timeout).await
    }
}

/// Fails naming the secret's place (never the secret) if any of `secrets`
/// occurs in `text`.
pub fn assert_no_secret(what: &str, text: &str, secrets: &[String]) {
    for (i, secret) in secrets.iter().enumerate() {
        assert!(!secret.is_empty(), "secret #{i} is empty");
        assert!(
            !text.contains(secret.as_str()),
            "{what} shows secret #{i} (of {})",
            secrets.len()
        );
    }
}
