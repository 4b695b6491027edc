//! A private Tansu broker for one test — for tests that freeze the broker
//! (SIGSTOP/SIGCONT), which they cannot do to the shared one.
//!
//! The binary comes from `TEST_TANSU_BIN` (exported by `scripts/test`); its
//! in-memory engine starts empty and loses everything when the process ends,
//! so a private broker is frozen and thawed, never restarted.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::testing::wait_for;

pub struct Tansu {
    child: std::process::Child,
    port: u16,
}

impl Tansu {
    pub async fn start() -> anyhow::Result<Tansu> {
        let bin = std::env::var("TEST_TANSU_BIN")
            .context("TEST_TANSU_BIN is not set (scripts/test exports it)")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(&bin)
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let tansu = Tansu { child, port };
        let bootstrap = tansu.bootstrap();
        wait_for("the private broker", Duration::from_secs(30), || {
            let bootstrap = bootstrap.clone();
            async move {
                let ok = tokio::task::spawn_blocking(move || {
                    use rdkafka::consumer::{BaseConsumer, Consumer};
                    let c: BaseConsumer = rdkafka::ClientConfig::new()
                        .set("bootstrap.servers", &bootstrap)
                        .create()
                        .ok()?;
                    c.fetch_metadata(None, Duration::from_secs(2)).ok()
                })
                .await?
                .is_some();
                Ok(ok.then_some(()))
            }
        })
        .await?;
        Ok(tansu)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGSTOP: connections stay open, nothing is answered.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT.
    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {sig} {} failed", self.child.id());
        }
        Ok(())
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.thaw();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
