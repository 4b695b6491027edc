//! The order domain: what a valid new order is, the status machine, and the
//! JSON shapes of an order and of its outbox events.
//!
//! ```text
//!  CREATED ──▶ PAID ──▶ SHIPPED ──▶ DELIVERED
//!     │          │
//!     └──────────┴──▶ CANCELLED
//! ```
//!
//! Validation here is at least as strict as the table's CHECK constraints
//! (V1), so a request that passes it cannot be refused by the database for
//! its content: invalid input is a 422 naming the field, never a 500.

use chrono::{DateTime, SecondsFormat, Utc};
use outbox_record::event::OrderPayload;
use serde::Serialize;
use serde_json::{Map, Value};

/// Bounds from the contract (issue 4).
pub const MAX_ITEMS: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;
pub const MAX_SKU_CHARS: usize = 64;
pub const MAX_EMAIL_CHARS: usize = 254;

/// An order's status (the `orders.status` column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Created,
    Paid,
    Shipped,
    Delivered,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Created,
        Status::Paid,
        Status::Shipped,
        Status::Delivered,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Created => "CREATED",
            Status::Paid => "PAID",
            Status::Shipped => "SHIPPED",
            Status::Delivered => "DELIVERED",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether `self → to` is allowed: CREATED→PAID→SHIPPED→DELIVERED, and
    /// CREATED or PAID→CANCELLED.
    pub fn can_become(self, to: Status) -> bool {
        matches!(
            (self, to),
            (Status::Created, Status::Paid)
                | (Status::Paid, Status::Shipped)
                | (Status::Shipped, Status::Delivered)
                | (Status::Created, Status::Cancelled)
                | (Status::Paid, Status::Cancelled)
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of an order (the record contract's type: the payload carries it).
pub use outbox_record::event::Item;

/// A validated `POST /orders` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewOrder {
    pub user_id: i64,
    pub email: String,
    pub currency: String,
    pub items: Vec<Item>,
    /// Σ quantity × unit_price_cents, checked for overflow.
    pub total_cents: i64,
}

/// One field that failed validation: a JSON-pointer-like path (`items[0].sku`)
/// and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub detail: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            detail: detail.into(),
        }
    }
}

/// Validates a `POST /orders` body, reporting every field that is wrong.
/// Unknown fields are ignored.
pub fn validate_new_order(body: &Value) -> Result<NewOrder, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new(
            "",
            format!(
                "the body must be a JSON object, not {}",
                json_type_name(body)
            ),
        )]);
    };
    let mut errors = Vec::new();
    let user_id = positive_int(obj, "user_id", &mut errors);
    let email = string_field(obj, "email", &mut errors).and_then(|e| match email_problem(e) {
        Some(p) => {
            errors.push(FieldError::new("email", p));
            None
        }
        None => Some(e.to_owned()),
    });
    let currency = string_field(obj, "currency", &mut errors).and_then(|c| {
        if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
            Some(c.to_owned())
        } else {
            errors.push(FieldError::new(
                "currency",
                "must be a 3-letter ISO 4217 code in upper case, e.g. EUR",
            ));
            None
        }
    });
    let items = items_field(obj, &mut errors);
    let total_cents = items.as_ref().and_then(|items| {
        let total = items.iter().try_fold(0i64, |acc, it| {
            it.quantity
                .checked_mul(it.unit_price_cents)
                .and_then(|line| acc.checked_add(line))
        });
        if total.is_none() {
            errors.push(FieldError::new(
                "items",
                "the order total (sum of quantity × unit_price_cents) is too large",
            ));
        }
        total
    });
    match (user_id, email, currency, items, total_cents) {
        (Some(user_id), Some(email), Some(currency), Some(items), Some(total_cents))
            if errors.is_empty() =>
        {
            Ok(NewOrder {
                user_id,
                email,
                currency,
                items,
                total_cents,
            })
        }
        _ => Err(errors),
    }
}

/// Validates a `POST /orders/{id}/status` body: `{"status": "PAID"}`.
pub fn validate_status_change(body: &Value) -> Result<Status, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new(
            "",
            format!(
                "the body must be a JSON object, not {}",
                json_type_name(body)
            ),
        )]);
    };
    let mut errors = Vec::new();
    let status = string_field(obj, "status", &mut errors).and_then(|s| {
        let parsed = Status::parse(s);
        if parsed.is_none() {
            errors.push(FieldError::new(
                "status",
                "must be one of CREATED, PAID, SHIPPED, DELIVERED, CANCELLED",
            ));
        }
        parsed
    });
    status.ok_or(errors)
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn positive_int(
    obj: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(v) => match v.as_i64() {
            Some(n) if n > 0 => Some(n),
            Some(_) => {
                errors.push(FieldError::new(field, "must be a positive integer"));
                None
            }
            None => {
                errors.push(FieldError::new(
                    field,
                    format!(
                        "must be a positive integer below 2^63, not {}",
                        json_type_name(v)
                    ),
                ));
                None
            }
        },
    }
}

fn string_field<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<&'a str> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            errors.push(FieldError::new(
                field,
                format!("must be a string, not {}", json_type_name(v)),
            ));
            None
        }
    }
}

/// Why `email` is not a plausible address, if it is not: `local@domain.tld`,
/// at most 254 characters, no spaces or control characters.
fn email_problem(email: &str) -> Option<&'static str> {
    if email.chars().count() > MAX_EMAIL_CHARS {
        return Some("must be at most 254 characters");
    }
    if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("must not contain spaces or control characters");
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return Some("must be an address like name@example.com");
    };
    if local.is_empty() || local.chars().count() > 64 || local.contains('@') {
        return Some("must be an address like name@example.com");
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 || labels.iter().any(|l| l.is_empty()) {
        return Some("must be an address like name@example.com (the domain needs a dot)");
    }
    None
}

fn items_field(obj: &Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<Vec<Item>> {
    let items = match obj.get("items") {
        None | Some(Value::Null) => {
            errors.push(FieldError::new("items", "is required"));
            return None;
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            errors.push(FieldError::new(
                "items",
                format!("must be an array, not {}", json_type_name(v)),
            ));
            return None;
        }
    };
    if items.is_empty() || items.len() > MAX_ITEMS {
        errors.push(FieldError::new(
            "items",
            format!("must hold 1 to {MAX_ITEMS} items, not {}", items.len()),
        ));
        return None;
    }
    let before = errors.len();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let path = |f: &str| format!("items[{i}].{f}");
        let Some(obj) = item.as_object() else {
            errors.push(FieldError::new(
                format!("items[{i}]"),
                format!("must be an object, not {}", json_type_name(item)),
            ));
            continue;
        };
        let sku = match obj.get("sku") {
            Some(Value::String(s)) => {
                let n = s.chars().count();
                if n == 0 || n > MAX_SKU_CHARS {
                    errors.push(FieldError::new(
                        path("sku"),
                        format!("must be 1 to {MAX_SKU_CHARS} characters"),
                    ));
                    None
                } else if s.chars().any(char::is_control) {
                    errors.push(FieldError::new(
                        path("sku"),
                        "must not contain control characters",
                    ));
                    None
                } else {
                    Some(s.clone())
                }
            }
            None | Some(Value::Null) => {
                errors.push(FieldError::new(path("sku"), "is required"));
                None
            }
            Some(v) => {
                errors.push(FieldError::new(
                    path("sku"),
                    format!("must be a string, not {}", json_type_name(v)),
                ));
                None
            }
        };
        let quantity = bounded_int(
            obj.get("quantity"),
            &path("quantity"),
            1,
            MAX_QUANTITY,
            errors,
        );
        let price = bounded_int(
            obj.get("unit_price_cents"),
            &path("unit_price_cents"),
            0,
            i64::MAX,
            errors,
        );
        if let (Some(sku), Some(quantity), Some(unit_price_cents)) = (sku, quantity, price) {
            out.push(Item {
                sku,
                quantity,
                unit_price_cents,
            });
        }
    }
    (errors.len() == before).then_some(out)
}

fn bounded_int(
    v: Option<&Value>,
    field: &str,
    min: i64,
    max: i64,
    errors: &mut Vec<FieldError>,
) -> Option<i64> {
    let range = if max == i64::MAX {
        format!("an integer ≥ {min}")
    } else {
        format!("an integer from {min} to {max}")
    };
    match v {
        None | Some(Value::Null) => {
            errors.push(FieldError::new(field, "is required"));
            None
        }
        Some(v) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(_) => {
                errors.push(FieldError::new(field, format!("must be {range}")));
                None
            }
            None => {
                let what = if v.is_number() {
                    "a number out of range or with a fraction"
                } else {
                    json_type_name(v)
                };
                errors.push(FieldError::new(
                    field,
                    format!("must be {range}, not {what}"),
                ));
                None
            }
        },
    }
}

/// An order as stored and as returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub email: String,
    pub status: Status,
    pub items: Vec<Item>,
    pub total_cents: i64,
    pub currency: String,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// The outbox event types and aggregate type (the record contract's).
pub use outbox_record::event::{
    ORDER_AGGREGATE as AGGREGATE_TYPE, ORDER_CREATED, ORDER_STATUS_CHANGED,
};

impl Order {
    /// The outbox payload: everything a consumer needs without calling back.
    pub fn event_payload(&self, change: Option<(Status, Status)>) -> Value {
        let payload = OrderPayload {
            order_id: self.id,
            user_id: self.user_id,
            email: self.email.clone(),
            status: self.status.as_str().to_owned(),
            items: self.items.clone(),
            total_cents: self.total_cents,
            currency: self.currency.clone(),
            created_at: self.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            updated_at: self.updated_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            from: change.map(|(from, _)| from.as_str().to_owned()),
            to: change.map(|(_, to)| to.as_str().to_owned()),
        };
        serde_json::to_value(payload).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"user_id": 42, "email": "a@b.c", "currency": "EUR",
               "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}]})
    }

    fn fields(v: Value) -> Vec<String> {
        validate_new_order(&v)
            .expect_err("should be invalid")
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn accepts_the_spec_example() {
        let o = validate_new_order(&valid()).expect("valid");
        assert_eq!(o.total_cents, 3998);
        assert_eq!(o.items.len(), 1);
    }

    #[test]
    fn names_each_bad_field() {
        let mut v = valid();
        v["user_id"] = json!(0);
        assert_eq!(fields(v), ["user_id"]);
        let mut v = valid();
        v["email"] = json!("nope");
        assert_eq!(fields(v), ["email"]);
        let mut v = valid();
        v["currency"] = json!("eur");
        assert_eq!(fields(v), ["currency"]);
        let mut v = valid();
        v["items"][0]["quantity"] = json!(10_001);
        assert_eq!(fields(v), ["items[0].quantity"]);
        let mut v = valid();
        v["items"][0]["unit_price_cents"] = json!(-1);
        assert_eq!(fields(v), ["items[0].unit_price_cents"]);
        let mut v = valid();
        v["items"] = json!([]);
        assert_eq!(fields(v), ["items"]);
        assert_eq!(fields(json!({})), ["user_id", "email", "currency", "items"]);
        assert_eq!(fields(json!([1])), [""]);
    }

    #[test]
    fn total_overflow_is_a_field_error() {
        let mut v = valid();
        v["items"] = json!([
            {"sku": "A", "quantity": 10000, "unit_price_cents": i64::MAX / 2},
        ]);
        assert_eq!(fields(v), ["items"]);
    }

    #[test]
    fn emails() {
        for ok in ["a@b.c", "first.last+tag@example.co.uk"] {
            assert_eq!(email_problem(ok), None, "{ok}");
        }
        for bad in [
            "", "a", "@b.c", "a@", "a@b", "a@b.", "a b@c.d", "a@@b.c", "a@b..c", "a\0@b.c",
        ] {
            assert!(email_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn transitions() {
        use Status::*;
        let legal = [
            (Created, Paid),
            (Paid, Shipped),
            (Shipped, Delivered),
            (Created, Cancelled),
            (Paid, Cancelled),
        ];
        for from in Status::ALL {
            for to in Status::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from}→{to}"
                );
            }
        }
    }
}
