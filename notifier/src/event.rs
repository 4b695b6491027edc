//! Event: one outbox record from Kafka, decoded into what an email needs.
//!
//! ```text
//!  headers event_id, event_type, commit_ts ─┐
//!  value {id, event_type, payload: {..}} ───┼─▶ Decoded::Notify(OrderEvent)   → one email
//!                                           ├─▶ Decoded::Skip { .. }          → counted, nothing sent
//!                                           └─▶ Err(MalformedEvent)           → dead-letter topic
//! ```
//!
//! The record is what the relay produces (SPEC.md): value = the outbox row as
//! JSON with `payload` embedded (the Kafka Connect `{"schema","payload"}`
//! envelope of `--value-format connect-json` is unwrapped too), headers
//! `event_id`, `event_type` and `commit_ts`. Headers win; the row's `id` and
//! `event_type` columns are the fallback.
//!
//! Forward compatibility: an event type this notifier does not know, or an
//! `OrderStatusChanged` to a status without an email, is skipped, not
//! dead-lettered. A known event whose payload lacks what the email needs
//! (order id, a valid address, well-formed items) is malformed.
//!
//! Decoding never panics, whatever the bytes.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

pub use outbox_record::event::{ORDER_CREATED, ORDER_STATUS_CHANGED};
use outbox_record::header;

/// Which email an event becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notification {
    /// `OrderCreated`: "order received".
    Received,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
}

impl Notification {
    /// The email for an order reaching `status`, if that status has one.
    pub fn for_status(status: &str) -> Option<Notification> {
        match status {
            "PAID" => Some(Notification::Paid),
            "SHIPPED" => Some(Notification::Shipped),
            "DELIVERED" => Some(Notification::Delivered),
            "CANCELLED" => Some(Notification::Cancelled),
            _ => None,
        }
    }
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// The order as the event's payload describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Order {
    pub order_id: i64,
    pub email: String,
    pub items: Vec<Item>,
    pub total_cents: i64,
    pub currency: String,
}

/// An event that becomes one email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderEvent {
    /// The outbox id: the idempotency key and the base of the Message-ID.
    pub event_id: i64,
    pub event_type: String,
    pub notification: Notification,
    pub order: Order,
}

/// What a record is to the notifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Notify(OrderEvent),
    /// Nothing to send: an unknown event type or a status without an email.
    Skip {
        event_type: String,
        reason: String,
    },
}

/// Why a record can never be handled (it goes to the dead-letter topic).
#[derive(Debug, thiserror::Error)]
pub enum MalformedEvent {
    #[error("record has no value")]
    NoValue,
    #[error("record value is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("record value is not a JSON object")]
    NotAnObject,
    #[error("record has no event type (no event_type header or column)")]
    MissingEventType,
    #[error("record has no event id (no numeric event_id header or id column)")]
    MissingEventId,
    #[error("{event_type} payload has no {field}")]
    MissingField {
        event_type: String,
        field: &'static str,
    },
    #[error("{event_type} payload field {field} is invalid: {detail}")]
    InvalidField {
        event_type: String,
        field: &'static str,
        detail: String,
    },
}

impl MalformedEvent {
    /// A short machine-readable class for the DLQ header.
    pub fn class(&self) -> &'static str {
        match self {
            MalformedEvent::NoValue | MalformedEvent::Json(_) | MalformedEvent::NotAnObject => {
                "malformed_record"
            }
            MalformedEvent::MissingEventType | MalformedEvent::MissingEventId => "missing_metadata",
            MalformedEvent::MissingField { .. } | MalformedEvent::InvalidField { .. } => {
                "invalid_payload"
            }
        }
    }
}

/// The `commit_ts` header (RFC 3339), if present and valid.
pub fn commit_ts(header: Option<&[u8]>) -> Option<DateTime<Utc>> {
    header::parse_commit_ts(std::str::from_utf8(header?).ok()?)
}

/// Decodes one record. `header(name)` returns the first header called `name`.
pub fn decode<'a>(
    value: Option<&[u8]>,
    header: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Decoded, MalformedEvent> {
    let header_text = |name: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let value = value.ok_or(MalformedEvent::NoValue)?;
    let json: Value = serde_json::from_slice(value).map_err(MalformedEvent::Json)?;
    let row = unwrap_envelope(json)?;

    let event_type = header_text(header::EVENT_TYPE)
        .or_else(|| row.get("event_type").and_then(text))
        .ok_or(MalformedEvent::MissingEventType)?;
    let notification = match event_type.as_str() {
        ORDER_CREATED => Some(Notification::Received),
        ORDER_STATUS_CHANGED => None,
        _ => {
            return Ok(Decoded::Skip {
                reason: format!("unknown event type {event_type:?}"),
                event_type,
            })
        }
    };
    let event_id = header_text(header::EVENT_ID)
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| row.get("id").and_then(integer))
        .ok_or(MalformedEvent::MissingEventId)?;

    let payload = payload_object(&row, &event_type)?;
    let missing = |field| MalformedEvent::MissingField {
        event_type: event_type.clone(),
        field,
    };
    let invalid = |field, detail: String| MalformedEvent::InvalidField {
        event_type: event_type.clone(),
        field,
        detail,
    };

    let notification = match notification {
        Some(n) => n,
        None => {
            let status = payload
                .get("to")
                .or_else(|| payload.get("status"))
                .ok_or_else(|| missing("to"))?;
            let status = status
                .as_str()
                .ok_or_else(|| invalid("to", "not a string".into()))?;
            match Notification::for_status(status) {
                Some(n) => n,
                None => {
                    return Ok(Decoded::Skip {
                        reason: format!("no email for status {status:?}"),
                        event_type,
                    })
                }
            }
        }
    };

    let order_id = payload.get("order_id").ok_or_else(|| missing("order_id"))?;
    let order_id = integer(order_id).ok_or_else(|| invalid("order_id", "not an integer".into()))?;
    let email = payload.get("email").ok_or_else(|| missing("email"))?;
    let email = email
        .as_str()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| invalid("email", "not a non-empty string".into()))?
        .to_owned();
    let items = match payload.get("items") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                parse_item(item).map_err(|d| invalid("items", format!("item {i}: {d}")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(invalid("items", "not an array".into())),
    };
    let total_cents = match payload.get("total_cents") {
        None | Some(Value::Null) => items
            .iter()
            .map(|i| i.quantity.saturating_mul(i.unit_price_cents))
            .fold(0i64, i64::saturating_add),
        Some(v) => integer(v).ok_or_else(|| invalid("total_cents", "not an integer".into()))?,
    };
    let currency = payload
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    Ok(Decoded::Notify(OrderEvent {
        event_id,
        event_type,
        notification,
        order: Order {
            order_id,
            email,
            items,
            total_cents,
            currency,
        },
    }))
}

/// The outbox row: the value itself, or the `payload` of a Kafka Connect
/// JsonConverter envelope.
fn unwrap_envelope(json: Value) -> Result<Map<String, Value>, MalformedEvent> {
    let Value::Object(mut obj) = json else {
        return Err(MalformedEvent::NotAnObject);
    };
    if obj.contains_key("schema") {
        if let Some(Value::Object(row)) = obj.remove("payload") {
            return Ok(row);
        }
    }
    Ok(obj)
}

/// The row's `payload` column as an object (a JSON string is parsed, as the
/// Connect envelope carries `jsonb` as text).
fn payload_object(
    row: &Map<String, Value>,
    event_type: &str,
) -> Result<Map<String, Value>, MalformedEvent> {
    let invalid = |detail: &str| MalformedEvent::InvalidField {
        event_type: event_type.to_owned(),
        field: "payload",
        detail: detail.to_owned(),
    };
    match row.get("payload") {
        None | Some(Value::Null) => Err(MalformedEvent::MissingField {
            event_type: event_type.to_owned(),
            field: "payload",
        }),
        Some(Value::Object(p)) => Ok(p.clone()),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(Value::Object(p)) => Ok(p),
            _ => Err(invalid("a string that is not a JSON object")),
        },
        Some(_) => Err(invalid("not an object")),
    }
}

fn parse_item(item: &Value) -> Result<Item, String> {
    let obj = item.as_object().ok_or("not an object")?;
    let sku = obj
        .get("sku")
        .and_then(Value::as_str)
        .ok_or("no sku string")?
        .to_owned();
    let quantity = obj
        .get("quantity")
        .and_then(integer)
        .ok_or("no integer quantity")?;
    let unit_price_cents = obj
        .get("unit_price_cents")
        .and_then(integer)
        .ok_or("no integer unit_price_cents")?;
    Ok(Item {
        sku,
        quantity,
        unit_price_cents,
    })
}

/// A JSON integer, or a string holding one.
fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(event_type: &str, payload: Value) -> Vec<u8> {
        json!({
            "id": 17,
            "aggregate_type": "order",
            "aggregate_id": "5",
            "user_id": 42,
            "event_type": event_type,
            "payload": payload,
            "created_at": "2026-01-01T00:00:00.000000Z",
        })
        .to_string()
        .into_bytes()
    }

    fn order_payload() -> Value {
        json!({
            "order_id": 5, "user_id": 42, "email": "a@b.example", "status": "CREATED",
            "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}],
            "total_cents": 3998, "currency": "EUR",
        })
    }

    fn headers<'a>(hs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| {
            hs.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    #[test]
    fn order_created_becomes_received() {
        let value = row("OrderCreated", order_payload());
        let d = decode(Some(&value), headers(&[(header::EVENT_ID, "17")])).unwrap();
        let Decoded::Notify(ev) = d else {
            panic!("{d:?}")
        };
        assert_eq!(ev.event_id, 17);
        assert_eq!(ev.notification, Notification::Received);
        assert_eq!(ev.order.order_id, 5);
        assert_eq!(ev.order.email, "a@b.example");
        assert_eq!(ev.order.total_cents, 3998);
        assert_eq!(ev.order.items[0].sku, "A-1");
    }

    #[test]
    fn headers_win_over_columns() {
        let value = row("OrderCreated", order_payload());
        let d = decode(
            Some(&value),
            headers(&[(header::EVENT_ID, "99"), (header::EVENT_TYPE, "Whatever")]),
        )
        .unwrap();
        assert!(matches!(d, Decoded::Skip { ref event_type, .. } if event_type == "Whatever"));
        let Decoded::Notify(ev) =
            decode(Some(&value), headers(&[(header::EVENT_ID, "99")])).unwrap()
        else {
            panic!()
        };
        assert_eq!(ev.event_id, 99);
    }

    #[test]
    fn status_changes() {
        let mut p = order_payload();
        p["from"] = json!("PAID");
        p["to"] = json!("SHIPPED");
        let value = row("OrderStatusChanged", p.clone());
        let Decoded::Notify(ev) = decode(Some(&value), headers(&[])).unwrap() else {
            panic!()
        };
        assert_eq!(ev.notification, Notification::Shipped);
        p["to"] = json!("REFUNDED");
        let value = row("OrderStatusChanged", p);
        assert!(matches!(
            decode(Some(&value), headers(&[])).unwrap(),
            Decoded::Skip { .. }
        ));
    }

    #[test]
    fn malformed_records() {
        assert!(matches!(
            decode(None, headers(&[])),
            Err(MalformedEvent::NoValue)
        ));
        assert!(matches!(
            decode(Some(b"{not json"), headers(&[])),
            Err(MalformedEvent::Json(_))
        ));
        assert!(matches!(
            decode(Some(b"[1]"), headers(&[])),
            Err(MalformedEvent::NotAnObject)
        ));
        let mut p = order_payload();
        p.as_object_mut().unwrap().remove("email");
        let err = decode(Some(&row("OrderCreated", p)), headers(&[])).unwrap_err();
        assert!(err.to_string().contains("email"), "{err}");
        let mut p = order_payload();
        p.as_object_mut().unwrap().remove("order_id");
        let err = decode(Some(&row("OrderCreated", p)), headers(&[])).unwrap_err();
        assert!(err.to_string().contains("order_id"), "{err}");
        let mut p = order_payload();
        p["items"] = json!([{"sku": 1}]);
        let err = decode(Some(&row("OrderCreated", p)), headers(&[])).unwrap_err();
        assert_eq!(err.class(), "invalid_payload");
    }

    #[test]
    fn connect_json_envelope_is_unwrapped() {
        let value = json!({
            "schema": {"type": "struct"},
            "payload": {"id": 3, "event_type": "OrderCreated", "payload": order_payload().to_string()},
        });
        let d = decode(Some(value.to_string().as_bytes()), headers(&[])).unwrap();
        assert!(matches!(d, Decoded::Notify(ref ev) if ev.event_id == 3));
    }

    #[test]
    fn commit_ts_header() {
        let t = commit_ts(Some(b"2026-01-01T00:00:01.000005Z")).unwrap();
        assert_eq!(t.timestamp_subsec_micros(), 5);
        assert!(commit_ts(Some(b"yesterday")).is_none());
        assert!(commit_ts(None).is_none());
    }

    #[test]
    fn never_panics_on_junk() {
        let junk: [&[u8]; 6] = [
            b"",
            b"\xff\xfe",
            b"null",
            b"{\"payload\": 1, \"event_type\": \"OrderCreated\", \"id\": 1}",
            b"{\"event_type\": \"OrderStatusChanged\", \"id\": 1, \"payload\": {\"to\": 5}}",
            b"{\"event_type\": \"OrderCreated\", \"id\": 1, \"payload\": {\"order_id\": 1, \"email\": \"x@y\", \"items\": 3}}",
        ];
        for j in junk {
            assert!(decode(Some(j), headers(&[(header::EVENT_ID, "\u{0}")])).is_err());
        }
    }
}
