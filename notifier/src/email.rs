//! Email: what the customer reads for each notification.
//!
//! One `OrderEvent` becomes one `multipart/alternative` message (plain text
//! and HTML) to the order's address, with a subject per notification and the
//! order's items and total in the body. The `Message-ID` is derived from the
//! event id only — `<order-event-{event_id}@notifier.outbox-relay>` — so a
//! resend of the same event (after a crash between sending and recording it
//! in the inbox) carries the same id and the receiving side can drop it.
//! A `Traceparent` header names the W3C trace the email belongs to (the
//! order's request, continued by the notifier's span), so one order can be
//! followed from curl to the inbox.

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::Message;

use outbox_record::trace::TraceParent;

use crate::event::{Item, Notification, OrderEvent};

/// The email header naming the trace (the W3C header name).
pub const TRACEPARENT_HEADER: &str = "Traceparent";

/// The domain part of every Message-ID this notifier writes.
pub const MESSAGE_ID_DOMAIN: &str = "notifier.outbox-relay";

/// The Message-ID of the email for event `event_id`.
pub fn message_id(event_id: i64) -> String {
    format!("<order-event-{event_id}@{MESSAGE_ID_DOMAIN}>")
}

/// Why an email could not be composed (never handleable: dead-letter it).
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The address itself is left out of the message (logs and DLQ
    /// headers); the dead-lettered record still carries it.
    #[error("the order's email address is invalid")]
    Recipient(#[source] lettre::address::AddressError),
    #[error("email could not be built")]
    Build(#[source] lettre::error::Error),
}

/// Builds emails from events, from one sender.
#[derive(Clone, Debug)]
pub struct Composer {
    from: Mailbox,
}

impl Composer {
    /// `from` is a mailbox such as `Shop <orders@shop.example>`.
    pub fn new(from: &str) -> Result<Composer, lettre::address::AddressError> {
        Ok(Composer {
            from: from.parse()?,
        })
    }

    /// The email for `event`, in the trace `trace` if given.
    pub fn compose(
        &self,
        event: &OrderEvent,
        trace: Option<&TraceParent>,
    ) -> Result<Message, ComposeError> {
        let to: Mailbox = event.order.email.parse().map_err(ComposeError::Recipient)?;
        let text = Text::new(event);
        let mut builder = Message::builder();
        if let Some(trace) = trace {
            builder = builder.raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(TRACEPARENT_HEADER),
                trace.to_string(),
            ));
        }
        builder
            .from(self.from.clone())
            .to(to)
            .subject(text.subject.clone())
            .message_id(Some(message_id(event.event_id)))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-Outbox-Event-Id"),
                event.event_id.to_string(),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-Order-Id"),
                event.order.order_id.to_string(),
            ))
            .multipart(MultiPart::alternative_plain_html(text.plain(), text.html()))
            .map_err(ComposeError::Build)
    }
}

/// The words of one email.
struct Text<'a> {
    event: &'a OrderEvent,
    subject: String,
    /// One sentence saying what happened.
    headline: String,
}

impl<'a> Text<'a> {
    fn new(event: &'a OrderEvent) -> Text<'a> {
        let id = event.order.order_id;
        let (subject, headline) = match event.notification {
            Notification::Received => (
                format!("Order #{id} received"),
                format!("Thank you for your order #{id}. We have received it and will let you know when it has been paid."),
            ),
            Notification::Paid => (
                format!("Order #{id}: payment received"),
                format!("We have received the payment for your order #{id}. It will be shipped soon."),
            ),
            Notification::Shipped => (
                format!("Order #{id} has shipped"),
                format!("Your order #{id} is on its way."),
            ),
            Notification::Delivered => (
                format!("Order #{id} has been delivered"),
                format!("Your order #{id} has been delivered. We hope you enjoy it."),
            ),
            Notification::Cancelled => (
                format!("Order #{id} has been cancelled"),
                format!("Your order #{id} has been cancelled. If you have paid, the amount will be refunded."),
            ),
        };
        Text {
            event,
            subject,
            headline,
        }
    }

    fn money(&self, cents: i64) -> String {
        format_money(cents, &self.event.order.currency)
    }

    fn line_total(item: &Item) -> i64 {
        item.quantity.saturating_mul(item.unit_price_cents)
    }

    fn plain(&self) -> String {
        let order = &self.event.order;
        let mut out = format!("Hello,\n\n{}\n\n", self.headline);
        if order.items.is_empty() {
            out.push_str("Items: none listed\n");
        } else {
            out.push_str("Items:\n");
            for item in &order.items {
                out.push_str(&format!(
                    "  {} x {} at {} = {}\n",
                    item.quantity,
                    item.sku,
                    self.money(item.unit_price_cents),
                    self.money(Self::line_total(item)),
                ));
            }
        }
        out.push_str(&format!(
            "Total: {}\n\nMicroshop\n",
            self.money(order.total_cents)
        ));
        out
    }

    fn html(&self) -> String {
        let order = &self.event.order;
        let mut rows = String::new();
        for item in &order.items {
            rows.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td style=\"text-align:right\">{}</td><td style=\"text-align:right\">{}</td></tr>\n",
                item.quantity,
                escape(&item.sku),
                escape(&self.money(item.unit_price_cents)),
                escape(&self.money(Self::line_total(item))),
            ));
        }
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{subject}</title></head><body>\n\
             <p>Hello,</p>\n<p>{headline}</p>\n\
             <table>\n<tr><th>Qty</th><th>Item</th><th>Price</th><th>Amount</th></tr>\n{rows}\
             <tr><td colspan=\"3\"><strong>Total</strong></td><td style=\"text-align:right\"><strong>{total}</strong></td></tr>\n\
             </table>\n<p>Microshop</p>\n</body></html>\n",
            subject = escape(&self.subject),
            headline = escape(&self.headline),
            total = escape(&self.money(order.total_cents)),
        )
    }
}

/// `1999, "EUR"` → `19.99 EUR`.
pub fn format_money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let amount = format!("{sign}{}.{:02}", abs / 100, abs % 100);
    if currency.is_empty() {
        amount
    } else {
        format!("{amount} {currency}")
    }
}

/// Escapes text for HTML element content and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Order;

    fn event(notification: Notification) -> OrderEvent {
        OrderEvent {
            event_id: 17,
            event_type: "OrderCreated".into(),
            notification,
            order: Order {
                order_id: 5,
                email: "a@b.example".into(),
                items: vec![Item {
                    sku: "<A-1>".into(),
                    quantity: 2,
                    unit_price_cents: 1999,
                }],
                total_cents: 3998,
                currency: "EUR".into(),
            },
        }
    }

    #[test]
    fn composes_message_with_derived_id() {
        let c = Composer::new("Shop <shop@x.example>").unwrap();
        let trace = TraceParent::root();
        let msg = c
            .compose(&event(Notification::Shipped), Some(&trace))
            .unwrap();
        let text = String::from_utf8(msg.formatted()).unwrap();
        assert!(text.contains(&format!("Traceparent: {trace}")), "{text}");
        assert!(
            text.contains("Message-ID: <order-event-17@notifier.outbox-relay>"),
            "{text}"
        );
        assert!(text.contains("Subject: Order #5 has shipped"), "{text}");
        assert!(text.contains("To: a@b.example"), "{text}");
        assert!(text.contains("X-Outbox-Event-Id: 17"), "{text}");
        assert!(text.contains("39.98 EUR"), "{text}");
        assert!(text.contains("&lt;A-1&gt;"), "html escaped: {text}");
        assert_eq!(msg.envelope().to()[0].to_string(), "a@b.example");
    }

    #[test]
    fn every_notification_has_its_own_subject() {
        let subjects: std::collections::HashSet<String> = [
            Notification::Received,
            Notification::Paid,
            Notification::Shipped,
            Notification::Delivered,
            Notification::Cancelled,
        ]
        .into_iter()
        .map(|n| Text::new(&event(n)).subject.clone())
        .collect();
        assert_eq!(subjects.len(), 5);
    }

    #[test]
    fn bad_recipient_is_an_error() {
        let c = Composer::new("shop@x.example").unwrap();
        let mut ev = event(Notification::Paid);
        ev.order.email = "not an address".into();
        assert!(matches!(
            c.compose(&ev, None),
            Err(ComposeError::Recipient(_))
        ));
    }

    #[test]
    fn money() {
        assert_eq!(format_money(5, "EUR"), "0.05 EUR");
        assert_eq!(format_money(123456, ""), "1234.56");
        assert_eq!(format_money(-250, "USD"), "-2.50 USD");
    }
}
