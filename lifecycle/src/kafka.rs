//! What every Kafka client of the project does the same way: its
//! configuration ([`client_config`]: the role's settings, then the
//! operator's `--kafka-property`/`--kafka-properties-file` last), refused
//! credentials or permissions ([`AccessDenied`], definite: the service stops
//! with it), topic creation ([`create_topics`]), a topic's configuration
//! ([`topic_config`]), and librdkafka's log lines
//! forwarded to `tracing`.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

/// A client configuration: `bootstrap.servers`, then `settings` (what the
/// client's role needs: producer, consumer or admin), then the operator's
/// pass-through `properties`, last, so that an operator can override any of
/// the above (security settings, timeouts, a `client.id`).
pub fn client_config<'a>(
    bootstrap_servers: &str,
    settings: impl IntoIterator<Item = (&'a str, String)>,
    properties: &[(String, String)],
) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap_servers);
    for (k, v) in settings {
        cfg.set(k, v);
    }
    for (k, v) in properties {
        cfg.set(k, v);
    }
    cfg
}

/// What [`create_topics`] did with one topic.
pub type TopicCreation = Result<Created, RDKafkaErrorCode>;

/// A topic [`create_topics`] was asked for is there now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created by this call.
    New,
    /// It existed already (created by someone else, maybe just now).
    Existed,
}

/// Creates `topics` with `partitions` partitions of `replication` replicas
/// each through the Admin API (an admin client from `config`), waiting at
/// most `timeout` for the cluster. A topic that exists already is
/// [`Created::Existed`], not an error; each other refusal is returned per
/// topic (see [`AccessDenied::new`] for the ones that are refused access).
/// The call fails as a whole when the client cannot be created or the
/// cluster does not answer within `timeout`.
pub async fn create_topics(
    config: &ClientConfig,
    topics: &[&str],
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<Vec<(String, TopicCreation)>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = tokio::time::timeout(timeout, admin.create_topics(new.iter(), &opts))
        .await
        .map_err(|_| KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut))??;
    Ok(results
        .into_iter()
        .map(|r| match r {
            Ok(topic) => (topic, Ok(Created::New)),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => (topic, Ok(Created::Existed)),
            Err((topic, code)) => (topic, Err(code)),
        })
        .collect())
}

/// The value of `key` in `topic`'s configuration (e.g. `max.message.bytes`,
/// `retention.ms`: the broker's default unless the topic overrides it),
/// asked for up to 10 s through the Admin API (an admin client from
/// `config`). `Ok(None)` when the broker does not name it; `Err` with the
/// reason when it cannot be read (no DescribeConfigs ACL, no broker).
pub async fn topic_config(
    config: &ClientConfig,
    topic: &str,
    key: &str,
) -> Result<Option<String>, String> {
    Ok(topic_configs(config, topic, &[key]).await?.pop().flatten())
}

/// [`topic_config`] of several keys in one request, their values in the
/// order of `keys`.
pub async fn topic_configs(
    config: &ClientConfig,
    topic: &str,
    keys: &[&str],
) -> Result<Vec<Option<String>>, String> {
    let timeout = Duration::from_secs(10);
    let admin: AdminClient<DefaultClientContext> = config.create().map_err(|e| e.to_string())?;
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = tokio::time::timeout(
        timeout,
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], &opts),
    )
    .await;
    let values = match described {
        Ok(Ok(mut results)) => match results.pop() {
            Some(Ok(resource)) => Ok(keys
                .iter()
                .map(|key| resource.get(key).and_then(|entry| entry.value.clone()))
                .collect()),
            Some(Err(code)) => Err(format!("{code:?}")),
            None => Ok(vec![None; keys.len()]),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    // Closing a client takes a while and nothing waits on it.
    std::thread::spawn(move || drop(admin));
    values
}

/// Kafka refused the client's credentials (authentication) or an operation
/// (authorization: no ACL allows it). Definite: retrying with the same
/// settings cannot succeed, so the relay and the notifier stop on it, with
/// this as the message. librdkafka's own text names neither password nor
/// anything else secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("Kafka {kind} failed: {detail} ({code}); {hint}", kind = self.kind(), hint = self.hint())]
pub struct AccessDenied {
    pub code: RDKafkaErrorCode,
    /// What was refused (librdkafka's reason, or the operation).
    pub detail: String,
}

impl AccessDenied {
    /// `Some` when `code` is an authentication or authorization failure.
    pub fn new(code: RDKafkaErrorCode, detail: impl Into<String>) -> Option<AccessDenied> {
        use RDKafkaErrorCode::*;
        matches!(
            code,
            Authentication
                | SaslAuthenticationFailed
                | UnsupportedSASLMechanism
                | IllegalSASLState
                | TopicAuthorizationFailed
                | GroupAuthorizationFailed
                | ClusterAuthorizationFailed
                | TransactionalIdAuthorizationFailed
                | DelegationTokenAuthorizationFailed
        )
        .then(|| AccessDenied {
            code,
            detail: detail.into(),
        })
    }

    /// [`AccessDenied::new`] for the code of `error`; also a TLS handshake
    /// that failed because the broker's certificate is not trusted (`detail`
    /// is librdkafka's reason then): the configured CA does not sign it,
    /// which no retry changes (other TLS failures, such as a reset
    /// handshake, stay transient).
    pub fn from_error(error: &KafkaError, detail: impl Into<String>) -> Option<AccessDenied> {
        let code = error.rdkafka_error_code()?;
        let detail = detail.into();
        if code == RDKafkaErrorCode::SSL && untrusted_certificate(&detail) {
            return Some(AccessDenied { code, detail });
        }
        AccessDenied::new(code, detail)
    }

    /// A refusal librdkafka only logs: a broker certificate it could not
    /// verify is a log line of facility `FAIL` (at error level), with no
    /// error event; the client just has no broker to talk to.
    pub fn from_log(level: RDKafkaLogLevel, facility: &str, message: &str) -> Option<AccessDenied> {
        let error = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
        );
        (error && facility == "FAIL" && untrusted_certificate(message)).then(|| AccessDenied {
            code: RDKafkaErrorCode::SSL,
            detail: message.to_owned(),
        })
    }

    pub fn is_authentication(&self) -> bool {
        use RDKafkaErrorCode::*;
        matches!(
            self.code,
            Authentication
                | SaslAuthenticationFailed
                | UnsupportedSASLMechanism
                | IllegalSASLState
                | SSL
        )
    }

    fn kind(&self) -> &'static str {
        if self.is_authentication() {
            "authentication"
        } else {
            "authorization"
        }
    }

    fn hint(&self) -> &'static str {
        if self.code == RDKafkaErrorCode::SSL {
            "the broker's TLS certificate is not signed by a CA the client trusts: check ssl.ca.location"
        } else if self.is_authentication() {
            "check security.protocol, sasl.mechanism, sasl.username and sasl.password (--kafka-property)"
        } else {
            "the Kafka user lacks the ACL for it; an operator has to grant it"
        }
    }
}

/// Whether librdkafka's reason for a TLS failure is a certificate it could
/// not verify (OpenSSL's "certificate verify failed").
fn untrusted_certificate(reason: &str) -> bool {
    reason.contains("certificate verify failed")
}

/// librdkafka's log lines, as rdkafka's default `ClientContext::log` writes
/// them (target `librdkafka`), for contexts that also look at them.
pub fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    if asked_for(facility, message) {
        tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}");
        return;
    }
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", "librdkafka: {facility} {message}")
        }
    }
}

/// Warnings about settings made on purpose, which ask for no action: the
/// relay sets `enable.gapless.guarantee` (experimental, librdkafka says on
/// every start) because its exactly-once proof needs it. Logged at debug,
/// so a clean start logs no warning an operator should learn to ignore.
fn asked_for(facility: &str, message: &str) -> bool {
    facility == "CONFWARN" && message.contains("enable.gapless.guarantee is experimental")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_chosen_setting_warning_is_quiet() {
        assert!(asked_for(
            "CONFWARN",
            "[thrd:app]: Configuration property enable.gapless.guarantee is experimental: When set to `true`, …"
        ));
        assert!(!asked_for(
            "CONFWARN",
            "[thrd:app]: Configuration property queue.buffering.max.ms is deprecated"
        ));
        assert!(!asked_for(
            "FAIL",
            "enable.gapless.guarantee is experimental"
        ));
    }

    #[test]
    fn operator_properties_come_last() {
        let cfg = client_config(
            "b:9092",
            [
                ("acks", "all".to_owned()),
                ("client.id", "relay".to_owned()),
            ],
            &[("client.id".to_owned(), "mine".to_owned())],
        );
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("client.id"), Some("mine"));
    }

    #[test]
    fn refusals_are_told_apart_from_other_errors() {
        let denied = AccessDenied::new(RDKafkaErrorCode::SaslAuthenticationFailed, "bad password")
            .expect("authentication failure");
        assert!(denied.is_authentication());
        assert!(denied.to_string().contains("sasl.password"), "{denied}");
        let acl = AccessDenied::new(RDKafkaErrorCode::TopicAuthorizationFailed, "topic t")
            .expect("authorization failure");
        assert!(!acl.is_authentication());
        assert!(acl.to_string().contains("ACL"), "{acl}");
        assert!(AccessDenied::new(RDKafkaErrorCode::BrokerTransportFailure, "down").is_none());
    }

    #[test]
    fn only_a_failed_certificate_check_in_a_fail_log_line_is_a_refusal() {
        let line = "ssl://127.0.0.1:19094/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed";
        let denied = AccessDenied::from_log(RDKafkaLogLevel::Error, "FAIL", line)
            .expect("untrusted certificate");
        assert!(denied.to_string().contains("ssl.ca.location"), "{denied}");
        assert!(AccessDenied::from_log(RDKafkaLogLevel::Warning, "FAIL", line).is_none());
        assert!(
            AccessDenied::from_log(RDKafkaLogLevel::Error, "FAIL", "Connection refused").is_none()
        );
    }
}
