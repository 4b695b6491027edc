//! The service's Prometheus metrics. The names are a contract (SPEC.md):
//! dashboards and alerts use them. Labels are low-cardinality: the matched
//! route template (`/orders/{id}`), never the raw path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

// prometheus-client appends `_total` to counters when it encodes them.
pub const HTTP_REQUESTS: &str = "http_requests";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
pub const ORDERS_CREATED: &str = "orders_created";

/// Route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

/// Every metric the service exports.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: Family<RouteLabels, Histogram>,
    /// Orders committed (idempotent replays are not counted).
    pub orders_created: Counter,
}

/// Latency buckets from 1 ms to 10 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            HTTP_REQUESTS,
            "HTTP requests answered, by method, route template and status",
            http_requests.clone(),
        );
        let http_request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(|| Histogram::new(BUCKETS));
        registry.register(
            HTTP_REQUEST_DURATION_SECONDS,
            "Time from request received to response ready, by method and route template",
            http_request_duration.clone(),
        );
        let orders_created = Counter::default();
        registry.register(
            ORDERS_CREATED,
            "Orders created (each with its OrderCreated outbox event)",
            orders_created.clone(),
        );
        Metrics {
            registry,
            http_requests,
            http_request_duration,
            orders_created,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        lifecycle::http::encode(&self.registry)
    }

    /// What `/metrics` answers.
    pub fn response(&self) -> axum::response::Response {
        lifecycle::http::metrics_response(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
