//! `devstack delete-by-prefix` (what `scripts/bench` tidies the stack's
//! broker with) on the real test broker: it deletes the topics and groups
//! named by the prefixes and nothing else, and refuses what it must not do.

use std::slice::from_ref;
use std::time::Duration;

use devstack::kafka::{create_topic, delete_by_prefix};
use devstack::testing::{kafka_bootstrap, unique_name, wait_for};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

fn client() -> anyhow::Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()?)
}

fn topics_on_broker() -> anyhow::Result<Vec<String>> {
    let md = client()?.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
}

fn groups_on_broker() -> anyhow::Result<Vec<String>> {
    let list = client()?.fetch_group_list(None, Duration::from_secs(10))?;
    Ok(list.groups().iter().map(|g| g.name().to_owned()).collect())
}

/// A group with an offset committed and no member left, as a benchmark
/// run's notifier group is once the notifier stopped.
fn group_with_offsets(group: &str, topic: &str) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut offsets = TopicPartitionList::new();
    offsets.add_partition_offset(topic, 0, Offset::Offset(0))?;
    consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync)?;
    Ok(())
}

#[tokio::test]
async fn deletes_the_named_topics_and_groups_and_nothing_else() -> anyhow::Result<()> {
    let bootstrap = kafka_bootstrap();
    let run = format!("{}.", unique_name("tidy"));
    let (topic, dlq) = (format!("{run}p2-500"), format!("{run}p2-500.dlq"));
    create_topic(&bootstrap, &topic, 3).await?;
    create_topic(&bootstrap, &dlq, 1).await?;
    // Another run's names: the same shape, a prefix that is not `run`.
    let other = format!("{}.", unique_name("tidy"));
    let kept_topic = format!("{other}p2-500");
    create_topic(&bootstrap, &kept_topic, 1).await?;
    let (group, kept_group) = (format!("{run}group"), format!("{other}group"));
    group_with_offsets(&group, &topic)?;
    group_with_offsets(&kept_group, &kept_topic)?;
    let groups = groups_on_broker()?;
    assert!(
        groups.contains(&group) && groups.contains(&kept_group),
        "{groups:?}"
    );

    let mut deleted = delete_by_prefix(&bootstrap, from_ref(&run), from_ref(&run)).await?;
    deleted.topics.sort();
    assert_eq!(deleted.topics, [topic.clone(), dlq.clone()]);
    assert_eq!(deleted.groups, vec![group.clone()]);

    wait_for(
        "the deleted topics to leave the metadata",
        Duration::from_secs(30),
        || async {
            let topics = topics_on_broker()?;
            Ok((!topics.contains(&topic) && !topics.contains(&dlq)).then_some(topics))
        },
    )
    .await
    .map(|topics| assert!(topics.contains(&kept_topic), "{topics:?}"))?;
    let groups = groups_on_broker()?;
    assert!(!groups.contains(&group), "{groups:?}");
    assert!(groups.contains(&kept_group), "{groups:?}");

    // Nothing left by the prefix: nothing deleted, no error.
    let again = delete_by_prefix(&bootstrap, from_ref(&run), from_ref(&run)).await?;
    assert!(
        again.topics.is_empty() && again.groups.is_empty(),
        "{again:?}"
    );
    delete_by_prefix(&bootstrap, from_ref(&other), from_ref(&other)).await?;
    Ok(())
}

#[tokio::test]
async fn refuses_an_empty_prefix_and_a_group_in_use() -> anyhow::Result<()> {
    let bootstrap = kafka_bootstrap();
    let empty = delete_by_prefix(&bootstrap, &[String::new()], &[]).await;
    assert!(
        format!("{:#}", empty.unwrap_err()).contains("empty prefix"),
        "an empty prefix would name every topic"
    );
    let empty_group = delete_by_prefix(&bootstrap, &[], &[String::new()]).await;
    assert!(empty_group.is_err());

    // A group whose member is still consuming is not deleted, and the
    // error names it.
    let prefix = format!("{}.", unique_name("tidy"));
    let topic = format!("{prefix}live");
    let group = format!("{prefix}live-group");
    create_topic(&bootstrap, &topic, 1).await?;
    let member: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("session.timeout.ms", "6000")
        .create()?;
    member.subscribe(&[&topic])?;
    wait_for(
        "the member to join its group",
        Duration::from_secs(45),
        || async {
            let _ = tokio::time::timeout(Duration::from_millis(200), member.recv()).await;
            Ok((member.assignment()?.count() > 0).then_some(()))
        },
    )
    .await?;
    let refused = delete_by_prefix(&bootstrap, &[], from_ref(&prefix)).await;
    let message = format!("{:#}", refused.unwrap_err());
    assert!(message.contains(&group), "{message}");
    assert!(groups_on_broker()?.contains(&group));
    drop(member);
    delete_by_prefix(&bootstrap, from_ref(&prefix), &[]).await?;
    Ok(())
}
