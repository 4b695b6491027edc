//! The replication connection against the real test Postgres: every
//! authentication method, TLS, slot preparation, streaming with
//! confirmation, slot contention, publication setup and cancel-safety.
//!
//! Needs the test stack (`source .run/test/env`). Each test has its own
//! database and slot and drops the slots it created, so the cluster's
//! slot limit is not exhausted.

use std::time::Duration;

use anyhow::{bail, ensure, Context};
use devstack::testing::{connect, unique_name, wait_for, TestDb};
use relay::lsn::Lsn;
use relay::replication::{
    ensure_publication, prepare_slot, slot_state, ConnectParams, PreparedSlot,
    ReplicationConnection, ReplicationError, ReplicationMessage, ReplicationStream, SslMode,
};

const PUBLICATION: &str = "outbox_pub";
const WAIT: Duration = Duration::from_secs(20);

/// Connection settings for `db` as `user` (the relay_* roles share the
/// superuser's password).
fn params(db: &TestDb, user: &str, ssl_mode: SslMode) -> anyhow::Result<ConnectParams> {
    let mut params = ConnectParams::from_url(&db.url)?;
    params.user = user.to_owned();
    params.ssl_mode = ssl_mode;
    params.application_name = "relay-test".to_owned();
    Ok(params)
}

fn superuser(db: &TestDb) -> anyhow::Result<ConnectParams> {
    let p = ConnectParams::from_url(&db.url)?;
    let user = p.user.clone();
    params(db, &user, SslMode::Prefer)
}

/// Drops `slots` if they exist, terminating a process that still holds one.
async fn drop_slots(db: &TestDb, slots: &[&str]) -> anyhow::Result<()> {
    let client = db.connect().await?;
    for slot in slots {
        wait_for("slot to become droppable", WAIT, || async {
            match slot_state(&client, slot).await? {
                None => Ok(Some(())),
                Some(info) if info.active => {
                    if let Some(pid) = info.active_pid {
                        client
                            .execute("SELECT pg_terminate_backend($1)", &[&pid])
                            .await?;
                    }
                    Ok(None)
                }
                Some(_) => {
                    client
                        .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                        .await?;
                    Ok(Some(()))
                }
            }
        })
        .await?;
    }
    Ok(())
}

/// Connects, prepares the slot and starts streaming it from its start.
async fn start_stream(db: &TestDb, slot: &str) -> anyhow::Result<ReplicationStream> {
    let client = db.connect().await?;
    let mut conn = ReplicationConnection::connect(&superuser(db)?).await?;
    ensure_publication(&client, PUBLICATION, Some("outbox")).await?;
    prepare_slot(&client, &mut conn, slot).await?;
    Ok(conn.start_replication(slot, Lsn::ZERO, PUBLICATION).await?)
}

/// Inserts `ids` (used as user_id, and in aggregate_id) in one transaction.
async fn insert_outbox(
    client: &mut tokio_postgres::Client,
    ids: &[i64],
    pad: usize,
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    for id in ids {
        tx.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload)
             VALUES ('order', $1, $2, 'OrderCreated', $3::text::jsonb)",
            &[&aggregate_id(*id, pad), id, &format!("{{\"n\": {id}}}")],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

fn aggregate_id(id: i64, pad: usize) -> String {
    format!("agg-{id}-{}", "x".repeat(pad))
}

/// Text columns of a pgoutput Insert message (protocol version 1).
fn insert_columns(data: &[u8]) -> anyhow::Result<Vec<Option<String>>> {
    ensure!(
        data.len() >= 8 && data[0] == b'I' && data[5] == b'N',
        "not an insert"
    );
    let ncols = u16::from_be_bytes([data[6], data[7]]);
    let mut at = 8;
    let mut cols = Vec::new();
    for _ in 0..ncols {
        let kind = *data.get(at).context("truncated tuple")?;
        at += 1;
        match kind {
            b'n' | b'u' => cols.push(None),
            b't' => {
                let len = u32::from_be_bytes(data.get(at..at + 4).context("truncated")?.try_into()?)
                    as usize;
                at += 4;
                let text = data.get(at..at + len).context("truncated column")?;
                cols.push(Some(String::from_utf8(text.to_vec())?));
                at += len;
            }
            other => bail!("unknown column kind {other}"),
        }
    }
    ensure!(at == data.len(), "trailing bytes after tuple");
    Ok(cols)
}

/// End LSN of a pgoutput Commit message.
fn commit_end_lsn(data: &[u8]) -> anyhow::Result<Lsn> {
    ensure!(data.len() == 26 && data[0] == b'C', "not a commit");
    Ok(Lsn(u64::from_be_bytes(data[10..18].try_into()?)))
}

async fn identify(params: &ConnectParams, expected_db: &str) -> anyhow::Result<()> {
    let mut conn = ReplicationConnection::connect(params).await?;
    let info = conn.identify_system().await?;
    ensure!(
        info.dbname.as_deref() == Some(expected_db),
        "dbname {:?}",
        info.dbname
    );
    ensure!(info.timeline >= 1 && info.xlogpos > Lsn::ZERO, "{info:?}");
    ensure!(!info.system_id.is_empty());
    conn.close().await?;
    Ok(())
}

#[tokio::test]
async fn trust_auth_connects_without_password() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let mut p = params(&db, "relay_trust", SslMode::Disable)?;
    p.password = None;
    identify(&p, &db.name).await
}

#[tokio::test]
async fn cleartext_password_auth_connects() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    identify(&params(&db, "relay_password", SslMode::Disable)?, &db.name).await
}

#[tokio::test]
async fn md5_auth_connects() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    identify(&params(&db, "relay_md5", SslMode::Disable)?, &db.name).await
}

#[tokio::test]
async fn scram_auth_connects_plain_and_over_tls() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let mut p = superuser(&db)?;
    p.ssl_mode = SslMode::Disable;
    identify(&p, &db.name).await?;
    p.ssl_mode = SslMode::Require;
    identify(&p, &db.name).await
}

#[tokio::test]
async fn wrong_password_is_definite_and_not_shown() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let secret = unique_name("wrong_secret");
    let superuser_name = superuser(&db)?.user;
    for user in ["relay_password", "relay_md5", superuser_name.as_str()] {
        let mut p = params(&db, user, SslMode::Disable)?;
        p.password = Some(secret.clone());
        let err = ReplicationConnection::connect(&p)
            .await
            .err()
            .with_context(|| format!("{user} connected with a wrong password"))?;
        ensure!(!err.is_transient(), "{user}: {err} classified transient");
        ensure!(err.sqlstate() == Some("28P01"), "{user}: {err}");
        let shown = format!("{err} {err:?} {p:?}");
        ensure!(!shown.contains(&secret), "{user}: password shown: {shown}");
    }
    Ok(())
}

#[tokio::test]
async fn sslmode_require_encrypts_and_disable_does_not() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    for (mode, expected) in [(SslMode::Require, "t"), (SslMode::Disable, "f")] {
        let mut p = superuser(&db)?;
        p.ssl_mode = mode;
        let mut conn = ReplicationConnection::connect(&p).await?;
        let rows = conn
            .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await?;
        ensure!(
            rows == vec![vec![Some(expected.to_owned())]],
            "{mode}: {rows:?}"
        );
        ensure!(conn.is_tls() == (mode == SslMode::Require));
        conn.close().await?;
    }
    Ok(())
}

#[tokio::test]
async fn verify_full_rejects_self_signed_certificate_definitely() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let mut p = superuser(&db)?;
    p.ssl_mode = SslMode::VerifyFull;
    let err = ReplicationConnection::connect(&p)
        .await
        .err()
        .context("verify-full accepted a self-signed certificate")?;
    ensure!(matches!(err, ReplicationError::Tls { .. }), "{err:?}");
    ensure!(!err.is_transient(), "{err}");
    Ok(())
}

#[tokio::test]
async fn verify_full_with_the_stack_ca_connects_over_tls() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let p = relay::replication::connect_params(&devstack::testing::verify_full_url(&db.url))?;
    ensure!(p.ssl_mode == SslMode::VerifyFull, "{p:?}");
    let ssl_of_own_backend = "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // The replication connection (the relay's own protocol code) …
    let mut conn = ReplicationConnection::connect(&p).await?;
    ensure!(conn.is_tls());
    let rows = conn.simple_query(ssl_of_own_backend).await?;
    ensure!(rows == vec![vec![Some("true".to_owned())]], "{rows:?}");
    conn.close().await?;
    // … and the SQL connection (pgconn), with the relay's application name.
    let client = relay::replication::sql_connect(&p).await?;
    let row = client
        .query_one(
            "SELECT s.ssl, a.application_name FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    ensure!(row.get::<_, bool>(0), "not encrypted");
    ensure!(
        row.get::<_, String>(1) == "relay",
        "{:?}",
        row.get::<_, String>(1)
    );
    // A CA that did not sign the certificate: refused, definitely.
    let other_ca = devstack::testing::another_ca()?;
    let mut wrong = p.clone();
    wrong.ssl_root_cert = Some(other_ca.into());
    let err = ReplicationConnection::connect(&wrong)
        .await
        .err()
        .context("a certificate from another CA was accepted")?;
    ensure!(!err.is_transient(), "{err}");
    let err = relay::replication::sql_connect(&wrong)
        .await
        .err()
        .context("the SQL connection accepted another CA's certificate")?;
    ensure!(!err.is_transient(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn streams_inserts_answers_keepalives_and_confirms() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let slot = db.slot_name();
    let result: anyhow::Result<()> = async {
        let mut client = db.connect().await?;
        let mut conn = ReplicationConnection::connect(&superuser(&db)?).await?;
        let created = prepare_slot(&client, &mut conn, &slot).await?;
        let PreparedSlot::Created { consistent_point } = created else {
            bail!("slot not created: {created:?}");
        };
        // Preparing again finds the slot and leaves it alone.
        let again = prepare_slot(&client, &mut conn, &slot).await?;
        ensure!(
            matches!(&again, PreparedSlot::Existing(info) if info.plugin.as_deref() == Some("pgoutput")),
            "{again:?}"
        );
        let mut stream = conn.start_replication(&slot, Lsn::ZERO, PUBLICATION).await?;

        insert_outbox(&mut client, &[1, 2, 3], 0).await?;

        let mut tags = Vec::new();
        let mut user_ids = Vec::new();
        let commit_end = tokio::time::timeout(WAIT, async {
            loop {
                match stream.recv().await? {
                    ReplicationMessage::XLogData { data, .. } => {
                        let tag = *data.first().context("empty XLogData")?;
                        tags.push(tag as char);
                        if tag == b'I' {
                            user_ids.push(insert_columns(&data)?[3].clone());
                        }
                        if tag == b'C' && !user_ids.is_empty() {
                            return commit_end_lsn(&data);
                        }
                    }
                    ReplicationMessage::Keepalive { wal_end, reply_requested: true, .. } => {
                        stream.send_status(wal_end, consistent_point, consistent_point, false).await?;
                    }
                    ReplicationMessage::Keepalive { .. } => {}
                }
            }
        })
        .await
        .context("timed out waiting for the transaction")??;
        let tags: String = tags.into_iter().collect();
        ensure!(tags.ends_with("BRIIIC") || tags.ends_with("BIIIC"), "tags {tags}");
        ensure!(tags.contains('R'), "no Relation message: {tags}");
        let expected: Vec<Option<String>> = ["1", "2", "3"].iter().map(|s| Some(s.to_string())).collect();
        ensure!(user_ids == expected, "{user_ids:?}");

        // Asking for a reply makes the server send a keepalive at once.
        stream.send_status(commit_end, commit_end, commit_end, true).await?;
        tokio::time::timeout(WAIT, async {
            loop {
                if let ReplicationMessage::Keepalive { wal_end, .. } = stream.recv().await? {
                    ensure!(wal_end >= commit_end, "keepalive at {wal_end} before {commit_end}");
                    stream.send_status(commit_end, commit_end, commit_end, false).await?;
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .context("no keepalive after a reply request")??;

        wait_for("confirmed_flush_lsn to reach the commit", WAIT, || async {
            let info = slot_state(&client, &slot).await?.context("slot vanished")?;
            Ok(info.confirmed_flush_lsn.filter(|lsn| *lsn >= commit_end))
        })
        .await?;

        stream.finish().await?;
        let info = slot_state(&client, &slot).await?.context("slot vanished")?;
        ensure!(!info.active, "slot still active after finish: {info:?}");
        Ok(())
    }
    .await;
    drop_slots(&db, &[&slot]).await?;
    result
}

#[tokio::test]
async fn second_start_on_active_slot_is_slot_busy() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let slot = db.slot_name();
    let result: anyhow::Result<()> = async {
        let first = start_stream(&db, &slot).await?;
        let second = ReplicationConnection::connect(&superuser(&db)?).await?;
        let err = second
            .start_replication(&slot, Lsn::ZERO, PUBLICATION)
            .await
            .err()
            .context("second START_REPLICATION succeeded")?;
        ensure!(matches!(err, ReplicationError::SlotBusy { .. }), "{err:?}");
        ensure!(err.is_transient(), "{err}");
        ensure!(err.sqlstate() == Some("55006"), "{err}");

        // Once the first stream finishes, the slot can be taken over.
        first.finish().await?;
        start_stream(&db, &slot).await?.finish().await?;
        Ok(())
    }
    .await;
    drop_slots(&db, &[&slot]).await?;
    result
}

#[tokio::test]
async fn prepare_rejects_slot_of_other_plugin_or_database() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let other_db = TestDb::create().await?;
    let wrong_plugin = db.slot_name();
    let foreign = format!("{}_x", db.slot_name());
    let result: anyhow::Result<()> = async {
        let client = db.connect().await?;
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&wrong_plugin],
            )
            .await?;
        other_db
            .connect()
            .await?
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&foreign],
            )
            .await?;
        let mut conn = ReplicationConnection::connect(&superuser(&db)?).await?;

        let err = prepare_slot(&client, &mut conn, &wrong_plugin)
            .await
            .err()
            .context("accepted a test_decoding slot")?;
        ensure!(
            matches!(err, ReplicationError::SlotWrongPlugin { .. }),
            "{err:?}"
        );
        ensure!(!err.is_transient(), "{err}");

        let err = prepare_slot(&client, &mut conn, &foreign)
            .await
            .err()
            .context("accepted another database's slot")?;
        ensure!(
            matches!(err, ReplicationError::SlotOtherDatabase { .. }),
            "{err:?}"
        );
        ensure!(!err.is_transient(), "{err}");

        // Neither slot was dropped.
        ensure!(slot_state(&client, &wrong_plugin).await?.is_some());
        ensure!(slot_state(&client, &foreign).await?.is_some());
        conn.close().await?;
        Ok(())
    }
    .await;
    drop_slots(&db, &[&wrong_plugin, &foreign]).await?;
    result
}

#[tokio::test]
async fn ensure_publication_creates_a_missing_one() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let client = db.connect().await?;
    client.batch_execute("DROP PUBLICATION outbox_pub").await?;

    ensure_publication(&client, PUBLICATION, Some("public.outbox")).await?;
    ensure_publication(&client, PUBLICATION, Some("outbox")).await?; // exists: left alone
    let row = client
        .query_one(
            "SELECT p.pubinsert, p.pubupdate, p.pubdelete,
                    array(SELECT schemaname || '.' || tablename FROM pg_publication_tables t
                           WHERE t.pubname = p.pubname)
               FROM pg_publication p WHERE p.pubname = $1",
            &[&PUBLICATION],
        )
        .await?;
    let (ins, upd, del, tables): (bool, bool, bool, Vec<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    ensure!(ins && !upd && !del, "publish flags {ins} {upd} {del}");
    ensure!(tables == ["public.outbox"], "{tables:?}");

    // Names are quoted, not interpolated.
    let odd = "Odd \"pub\"; --";
    ensure_publication(&client, odd, Some("outbox")).await?;
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&odd],
        )
        .await?
        .get(0);
    ensure!(n == 1);

    let err = ensure_publication(&client, "p2", Some("no_such_table"))
        .await
        .err()
        .context("published a missing table")?;
    ensure!(
        matches!(err, ReplicationError::TableMissing(_)) && !err.is_transient(),
        "{err:?}"
    );

    // A role without CREATE on the database cannot create it: definite.
    let mut url = ConnectParams::from_url(&db.url)?;
    url.user = "relay_trust".into();
    let unprivileged = connect(&format!(
        "host={} port={} user=relay_trust dbname={}",
        url.host, url.port, url.dbname
    ))
    .await?;
    let err = ensure_publication(&unprivileged, "p3", Some("outbox"))
        .await
        .err()
        .context("unprivileged role created a publication")?;
    ensure!(
        err.sqlstate() == Some("42501") && !err.is_transient(),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn recv_is_cancel_safe() -> anyhow::Result<()> {
    const TXS: i64 = 6;
    const PER_TX: i64 = 10;
    const PAD: usize = 20_000; // several TCP reads per message
    let db = TestDb::create().await?;
    let slot = db.slot_name();
    let result: anyhow::Result<()> = async {
        let mut stream = start_stream(&db, &slot).await?;
        let mut client = db.connect().await?;
        let writer = tokio::spawn(async move {
            for t in 0..TXS {
                let ids: Vec<i64> = (t * PER_TX + 1..=(t + 1) * PER_TX).collect();
                insert_outbox(&mut client, &ids, PAD).await?;
            }
            anyhow::Ok(())
        });

        let mut inserts = Vec::new();
        let (mut begins, mut commits, mut cancelled) = (0, 0, 0u32);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while commits < TXS {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "timed out; {} inserts",
                inserts.len()
            );
            let msg = match tokio::time::timeout(Duration::from_micros(300), stream.recv()).await {
                Err(_elapsed) => {
                    cancelled += 1;
                    continue;
                }
                Ok(msg) => msg?,
            };
            match msg {
                ReplicationMessage::XLogData { data, .. } => match data.first() {
                    Some(b'B') => begins += 1,
                    Some(b'C') if !inserts.is_empty() => commits += 1,
                    Some(b'I') => inserts.push(insert_columns(&data)?),
                    _ => {}
                },
                ReplicationMessage::Keepalive {
                    wal_end,
                    reply_requested: true,
                    ..
                } => {
                    stream
                        .send_status(wal_end, Lsn::ZERO, Lsn::ZERO, false)
                        .await?;
                }
                ReplicationMessage::Keepalive { .. } => {}
            }
        }
        writer.await??;
        ensure!(
            cancelled > 0,
            "no recv was ever cancelled; the test proves nothing"
        );
        ensure!(begins >= TXS, "{begins} begins");
        ensure!(
            inserts.len() == (TXS * PER_TX) as usize,
            "{} inserts",
            inserts.len()
        );
        for (i, cols) in inserts.iter().enumerate() {
            let id = i as i64 + 1;
            // The outbox's columns: id … created_at, traceparent, tracestate.
            ensure!(cols.len() == 9, "row {id}: {} columns", cols.len());
            ensure!(
                cols[3].as_deref() == Some(id.to_string().as_str()),
                "row {id}: user_id {:?}",
                cols[3]
            );
            ensure!(
                cols[2].as_deref() == Some(aggregate_id(id, PAD).as_str()),
                "row {id}: aggregate_id corrupted"
            );
            ensure!(
                cols[5].as_deref() == Some(format!("{{\"n\": {id}}}").as_str()),
                "row {id}: payload {:?}",
                cols[5]
            );
        }
        stream.finish().await?;
        Ok(())
    }
    .await;
    drop_slots(&db, &[&slot]).await?;
    result
}
