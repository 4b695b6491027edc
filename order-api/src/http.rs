//! The HTTP surface (SPEC.md, "order-api"): routes, request parsing and the
//! per-request middleware.
//!
//! ```text
//!  request ─▶ observe (span, timeout, metrics) ─▶ router ─▶ handler ─▶ store
//!                                                   │
//!                            body: Content-Type → size limit → JSON → fields
//!                                  415             413          400    422
//! ```
//!
//! Every answer that is not a success is `application/problem+json`
//! ([`ApiError`]); no input reaches the database unvalidated.
//!
//! Every request joins the W3C trace of its `traceparent` header (or starts
//! one; a malformed header is not continued, as the specification asks):
//! its log lines carry the trace id, the outbox row it writes carries the
//! `traceparent` to continue from, and the answer's `traceresponse` header
//! names the trace for a caller that sent none.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, MatchedPath, Path, Query, Request, State,
};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use outbox_record::trace::{accept_tracestate, TraceParent, TRACEPARENT, TRACESTATE};
use serde_json::{json, Value};
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::{Metrics, RequestLabels, RouteLabels, UNMATCHED_ROUTE};
use crate::order::{validate_new_order, validate_status_change, Order};
use crate::store::{Created, EventTrace, IdempotencyKey, StatusChange, Store, StoredResponse};

/// The hand-written OpenAPI 3 document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Orders per page of `GET /orders` unless `limit` says otherwise, and the
/// most `limit` may ask for.
pub const DEFAULT_PAGE: i64 = 50;
pub const MAX_PAGE: i64 = 500;

/// Longest accepted Idempotency-Key.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub body_limit: usize,
    pub request_timeout: Duration,
}

/// Every route: path template, method and handler. The router is built from
/// this table only, and a test checks each entry is in the OpenAPI document.
pub fn route_table() -> Vec<(&'static str, Method, MethodRouter<AppState>)> {
    vec![
        ("/orders", Method::POST, post(create_order)),
        ("/orders", Method::GET, get(list_orders)),
        ("/orders/{id}", Method::GET, get(get_order)),
        ("/orders/{id}/status", Method::POST, post(change_status)),
        ("/healthz", Method::GET, get(healthz)),
        ("/readyz", Method::GET, get(readyz)),
        ("/metrics", Method::GET, get(metrics)),
        ("/openapi.json", Method::GET, get(openapi)),
    ]
}

/// The service's router with its middleware.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, _, method_router) in route_table() {
        // Routes sharing a path merge their methods.
        router = router.route(path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The response header naming the request's trace (W3C Trace Context
/// level 2): `00-<trace id>-<order-api's span>-<flags>`.
pub const TRACERESPONSE: &str = "traceresponse";

/// Per request: a tracing span with method, matched route, trace id, status
/// and latency, joined to the caller's trace; the request timeout; the HTTP
/// metrics.
async fn observe(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    mut req: Request,
    next: Next,
) -> Response {
    let start = Instant::now();
    let method = method_label(req.method());
    let route = matched
        .as_ref()
        .map_or(UNMATCHED_ROUTE, |m| m.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "request",
        method,
        route = %route,
        trace_id = tracing::field::Empty,
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    let trace = join_trace(&span, req.headers());
    let traceresponse = HeaderValue::try_from(trace.traceparent.as_str()).ok();
    req.extensions_mut().insert(trace);
    let mut response = match tokio::time::timeout(state.request_timeout, next.run(req))
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        // Dropping the handler rolls its transaction back.
        Err(_) => ApiError::Timeout.into_response(),
    };
    if let Some(value) = traceresponse {
        response.headers_mut().insert(TRACERESPONSE, value);
    }
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    span.record("status", status);
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    span.in_scope(|| tracing::info!("request finished"));
    state
        .metrics
        .http_requests
        .get_or_create(&RequestLabels {
            method: method.to_owned(),
            route: route.clone(),
            status,
        })
        .inc();
    state
        .metrics
        .http_request_duration
        .get_or_create(&RouteLabels {
            method: method.to_owned(),
            route,
        })
        .observe(elapsed.as_secs_f64());
    response
}

/// Joins `span` to the trace of the request's `traceparent` (a new trace
/// without a valid one) and returns what the outbox row carries on.
fn join_trace(span: &tracing::Span, headers: &HeaderMap) -> EventTrace {
    let incoming = headers.get(TRACEPARENT).and_then(|v| {
        let parsed = v
            .to_str()
            .map_err(|_| "not visible ASCII".to_owned())
            .and_then(|v| TraceParent::parse(v).map_err(|e| e.to_string()));
        parsed
            .inspect_err(|e| tracing::debug!(error = %e, "traceparent not continued"))
            .ok()
    });
    // A tracestate belongs to the trace it came with: none for a new one.
    let tracestate = incoming
        .and(headers.get(TRACESTATE))
        .and_then(|v| v.to_str().ok())
        .and_then(accept_tracestate)
        .map(str::to_owned);
    let next = lifecycle::telemetry::continue_trace(span, incoming.as_ref());
    EventTrace {
        traceparent: next.to_string(),
        tracestate,
    }
}

/// The method as a metric label: the standard ones, anything else `OTHER`.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// A JSON request body: Content-Type checked (415), size limited (413),
/// parsed (400). Field validation is the handler's (422).
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.body_limit,
                }
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::MalformedJson(e.to_string()))
    }
}

/// `application/json` or any `application/*+json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The order id of a path, or 404: ids are positive integers, so anything
/// else names no order.
fn order_id(path: Result<Path<String>, PathRejection>) -> Result<i64, ApiError> {
    let Ok(Path(raw)) = path else {
        return Err(ApiError::NotFound("no such order".into()));
    };
    match raw.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::NotFound(
            "no such order: order ids are positive integers".into(),
        )),
    }
}

/// The JSON an order is answered with, and its `Location`.
pub fn render_created(order: &Order) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED.as_u16(),
        // Serialising an Order cannot fail: strings, integers and JSON.
        body: serde_json::to_string(order).unwrap_or_default(),
        location: Some(format!("/orders/{}", order.id)),
    }
}

fn stored_response(stored: StoredResponse) -> Response {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, stored.body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(loc) = stored.location.and_then(|l| HeaderValue::try_from(l).ok()) {
        headers.insert(header::LOCATION, loc);
    }
    resp
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    stored_response(StoredResponse {
        status: status.as_u16(),
        body: serde_json::to_string(body).unwrap_or_default(),
        location: None,
    })
}

/// The `Idempotency-Key` header, if present: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::field(
            "Idempotency-Key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"),
        )
    };
    let key = value.to_str().map_err(|_| bad())?;
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(Some(key.to_owned()))
}

/// `POST /orders`
async fn create_order(
    State(state): State<AppState>,
    Extension(trace): Extension<EventTrace>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let order = validate_new_order(&body).map_err(ApiError::Invalid)?;
    let key = key.map(|k| IdempotencyKey::new(&k, "POST /orders", &order));
    match state
        .store
        .create(&order, key.as_ref(), render_created, &trace)
        .await?
    {
        Created::New(order) => {
            state.metrics.orders_created.inc();
            tracing::info!(
                order_id = order.id,
                user_id = order.user_id,
                "order created"
            );
            Ok(stored_response(render_created(&order)))
        }
        Created::Replayed(stored) => Ok(stored_response(stored)),
        Created::KeyMismatch => Err(ApiError::IdempotencyKeyReused),
        Created::KeyInProgress => Err(ApiError::IdempotencyKeyInProgress),
    }
}

/// `GET /orders/{id}`
async fn get_order(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = order_id(path)?;
    match state.store.get(id).await? {
        Some(order) => Ok(json_response(StatusCode::OK, &order)),
        None => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

/// `GET /orders?user_id=42&limit=50&after=ID`
async fn list_orders(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut user_id = None;
    let mut limit = DEFAULT_PAGE;
    let mut after = 0;
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &params {
        let name = name.as_str();
        if seen.contains(&name) {
            return Err(ApiError::field(name, "is given more than once"));
        }
        match name {
            "user_id" => {
                user_id = Some(
                    value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ApiError::field(name, "must be a positive integer"))?,
                );
            }
            "limit" => {
                limit = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::field(name, format!("must be an integer from 1 to {MAX_PAGE}"))
                    })?;
            }
            "after" => {
                after = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| ApiError::field(name, "must be an order id (an integer ≥ 0)"))?;
            }
            _ => {
                return Err(ApiError::field(
                    name,
                    "is not a parameter of this route (user_id, limit, after)",
                ))
            }
        }
        seen.push(name);
    }
    // One more than asked for tells whether another page exists.
    let mut orders = state.store.list(user_id, after, limit + 1).await?;
    let more = orders.len() as i64 > limit;
    orders.truncate(limit as usize);
    let next_after = match orders.last() {
        Some(last) if more => Some(last.id),
        _ => None,
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({ "orders": orders, "next_after": next_after }),
    ))
}

/// `POST /orders/{id}/status`
async fn change_status(
    State(state): State<AppState>,
    Extension(trace): Extension<EventTrace>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let id = order_id(path)?;
    let to = validate_status_change(&body).map_err(ApiError::Invalid)?;
    match state.store.change_status(id, to, &trace).await? {
        StatusChange::Changed(order) => {
            tracing::info!(order_id = id, status = %to, "order status changed");
            Ok(json_response(StatusCode::OK, &order))
        }
        StatusChange::NotFound => Err(ApiError::NotFound(format!("no order {id}"))),
        StatusChange::Illegal { from } => Err(ApiError::IllegalTransition { id, from, to }),
    }
}

/// `GET /healthz`: the process is up and serving.
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: the database answers.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.store.ping().await?;
    Ok("ready\n")
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.response()
}

/// `GET /openapi.json`
async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see /openapi.json".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        for (ct, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_json(&h), ok, "{ct}");
        }
    }

    #[test]
    fn openapi_is_json() {
        let doc: Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    }
}
