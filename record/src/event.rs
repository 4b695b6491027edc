//! The outbox events and their payloads, as order-api writes them into
//! `outbox.payload` and the relay carries them, embedded, in the record
//! value's `payload` field.
//!
//! Both order events carry the whole order as it is after the change, so a
//! consumer never calls back; `OrderStatusChanged` adds `from` and `to`.
//! Statuses are upper-case text (`CREATED`, `PAID`, `SHIPPED`, `DELIVERED`,
//! `CANCELLED`). Consumers must skip event types they do not know.

use serde::{Deserialize, Serialize};

/// A new order was committed.
pub const ORDER_CREATED: &str = "OrderCreated";
/// An order's status changed.
pub const ORDER_STATUS_CHANGED: &str = "OrderStatusChanged";
/// `outbox.aggregate_type` of order events; `aggregate_id` is the order id.
pub const ORDER_AGGREGATE: &str = "order";

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// The payload of `OrderCreated` and `OrderStatusChanged`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPayload {
    pub order_id: i64,
    pub user_id: i64,
    pub email: String,
    /// The status after the event.
    pub status: String,
    pub items: Vec<Item>,
    pub total_cents: i64,
    pub currency: String,
    /// RFC 3339, microseconds, UTC.
    pub created_at: String,
    pub updated_at: String,
    /// `OrderStatusChanged` only: the status before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// `OrderStatusChanged` only: the status after (= `status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_change_carries_from_and_to_and_a_creation_does_not() {
        let mut p = OrderPayload {
            order_id: 7,
            user_id: 42,
            email: "a@b.c".into(),
            status: "CREATED".into(),
            items: vec![Item {
                sku: "A-1".into(),
                quantity: 2,
                unit_price_cents: 1999,
            }],
            total_cents: 3998,
            currency: "EUR".into(),
            created_at: "2026-11-30T10:00:00.000000Z".into(),
            updated_at: "2026-11-30T10:00:00.000000Z".into(),
            from: None,
            to: None,
        };
        let created = serde_json::to_value(&p).unwrap();
        assert!(created.get("from").is_none() && created.get("to").is_none());
        assert_eq!(created["items"][0]["unit_price_cents"], 1999);
        p.from = Some("CREATED".into());
        p.to = Some("PAID".into());
        p.status = "PAID".into();
        let changed = serde_json::to_string(&p).unwrap();
        let back: OrderPayload = serde_json::from_str(&changed).unwrap();
        assert_eq!(back, p);
    }
}
