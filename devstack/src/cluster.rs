//! A private, throwaway Postgres cluster for one test — for tests that stop,
//! crash or restart the server, which they cannot do to the shared test
//! cluster without breaking every other test running beside them.
//!
//! ```text
//!   PgCluster::start()   initdb (wal_level=logical, trust on 127.0.0.1) → pg_ctl start
//!                        → database `outbox` with the project's migrations
//!   .crash()             pg_ctl stop -m immediate (no shutdown checkpoint: crash recovery on start)
//!   .start_again()       pg_ctl start on the same data directory and port
//!   drop                 pg_ctl stop -m immediate, data directory removed
//! ```
//!
//! The server binaries come from `TEST_PG_BIN` (exported by `scripts/test`),
//! else `/usr/lib/postgresql/15/bin`. Postgres refuses to run as root, so
//! when the tests run as root the server commands run as the `postgres` user
//! (as the stack scripts do).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::testing::unique_name;

/// A running private cluster; stopped and deleted on drop.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PgCluster {
    /// initdb, start, create database `outbox` and migrate it.
    pub async fn start() -> anyhow::Result<PgCluster> {
        let bin = PathBuf::from(
            std::env::var("TEST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let data = std::env::temp_dir().join(unique_name("pgcluster"));
        let port = free_port()?;
        let cluster = PgCluster { bin, data, port };
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&cluster.data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n\
             fsync = off\nsynchronous_commit = on\n"
        );
        cluster.as_postgres_append(&cluster.data.join("postgresql.conf"), &conf)?;
        cluster.start_again()?;
        let admin = crate::testing::connect(&cluster.url("postgres")).await?;
        admin.batch_execute("CREATE DATABASE outbox").await?;
        crate::migrations::apply(&cluster.url("outbox")).await?;
        Ok(cluster)
    }

    /// Superuser URL of `dbname` on this cluster.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Stops the server the way a crash would: no shutdown checkpoint, open
    /// connections cut.
    pub fn crash(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"])
    }

    /// A clean restart (`pg_ctl restart -m fast`): connections are closed,
    /// a shutdown checkpoint is written.
    pub fn restart_fast(&self) -> anyhow::Result<()> {
        // Up to 120 s: a fast shutdown waits for every walsender to end, and
        // one whose client sends no standby reply ends only at
        // wal_sender_timeout (60 s by default; RELIABILITY.md, open findings).
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "120"])?;
        self.start_again()
    }

    /// Starts the server on its data directory (after `crash`, with recovery).
    pub fn start_again(&self) -> anyhow::Result<()> {
        let log = self.data.with_extension("log");
        self.pg_ctl(&["start", "-w", "-t", "60", "-l", path_str(&log)?])
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-D", path_str(&self.data)?];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(program);
        let out = as_postgres(path_str(&exe)?, args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn as_postgres_append(&self, file: &Path, text: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let mut child = as_postgres("tee", &["-a", path_str(file)?])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running tee")?;
        child
            .stdin
            .take()
            .context("tee's stdin")?
            .write_all(text.as_bytes())?;
        if !child.wait()?.success() {
            bail!("appending to {} failed", file.display());
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        let _ = std::fs::remove_dir_all(&self.data);
        let _ = std::fs::remove_file(self.data.with_extension("log"));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn as_postgres(program: &str, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
