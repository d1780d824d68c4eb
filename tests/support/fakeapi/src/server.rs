//! HTTP front end: routing, discovery, verbs, watch streaming, admin paths.

use crate::discovery;
use crate::error::ApiError;
use crate::faults::{FaultAction, FaultRule, Faults, OutageKind, RequestLog, RequestRecord, Verb};
use crate::patch::PatchType;
use crate::resources::{self, info, ResourceId};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOpts, DeleteOutcome, Event, EventType, ListOpts, Signal, Store, WriteOpts,
};
use crate::Options;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

/// Response body type.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Returned by the service to make hyper drop the connection.
#[derive(Debug, thiserror::Error)]
#[error("connection aborted by fault injection")]
pub struct Abort;

/// An access rule for SelfSubjectAccessReview: deny `verb` on `resource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    /// Verb (`*` for any).
    pub verb: String,
    /// Resource plural (`*` for any).
    pub resource: String,
}

/// Shared server state.
pub struct State {
    pub(crate) store: tokio::sync::Mutex<Store>,
    pub(crate) signals: broadcast::Sender<Signal>,
    pub(crate) faults: Faults,
    pub(crate) log: RequestLog,
    pub(crate) deny: Mutex<Vec<DenyRule>>,
    pub(crate) opts: Options,
    pub(crate) addr: Mutex<SocketAddr>,
}

impl State {
    pub(crate) fn new(opts: Options) -> Self {
        let (signals, _) = broadcast::channel(opts.watch_buffer.max(16));
        let mut store = Store::new(opts.history_size, signals.clone());
        let ns_id = resources::lookup("", "v1", "namespaces").unwrap_or(0);
        for ns in &opts.namespaces {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let _ = store.create(ns_id, None, obj, &WriteOpts::default());
        }
        State {
            store: tokio::sync::Mutex::new(store),
            faults: Faults::new(signals.clone()),
            signals,
            log: RequestLog::default(),
            deny: Mutex::new(Vec::new()),
            opts,
            addr: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
        }
    }

    pub(crate) fn deny_rules(&self) -> std::sync::MutexGuard<'_, Vec<DenyRule>> {
        match self.deny.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed_unsync()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn list_response(
    res: &crate::resources::ResourceInfo,
    items: &[Arc<Value>],
    metadata: &Value,
) -> Response<Body> {
    let mut buf = Vec::with_capacity(256 + items.len() * 1024);
    buf.extend_from_slice(b"{\"kind\":\"");
    buf.extend_from_slice(res.kind.as_bytes());
    buf.extend_from_slice(b"List\",\"apiVersion\":\"");
    buf.extend_from_slice(res.api_version().as_bytes());
    buf.extend_from_slice(b"\",\"metadata\":");
    let _ = serde_json::to_writer(&mut buf, metadata);
    buf.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = serde_json::to_writer(&mut buf, &**item);
    }
    buf.extend_from_slice(b"]}");
    let mut resp = Response::new(full(buf));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = json_response(e.code, &e.to_status());
    if let Some(r) = e.details.retry_after {
        if let Ok(v) = HeaderValue::from_str(&r.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}

fn text_response(code: u16, text: &str) -> Response<Body> {
    let mut resp = Response::new(full(text.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn pct_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parsed query string.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Self {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (pct_decode(k), pct_decode(v)),
                    None => (pct_decode(p), String::new()),
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true") | Some("1") | Some("True"))
    }
}

/// A resource request target.
#[derive(Debug, Clone)]
struct ResRoute {
    rid: ResourceId,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
    watch_path: bool,
}

enum Route {
    Health,
    Version,
    Api,
    Apis,
    GroupVersion(String, String),
    Group(String),
    Res(ResRoute),
    OpenApiRoot,
    OpenApiGv(String, String),
    NotFound,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segs.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => Route::Health,
        ["healthz", ..] | ["readyz", ..] | ["livez", ..] => Route::Health,
        ["version"] => Route::Version,
        ["api"] => Route::Api,
        ["apis"] => Route::Apis,
        ["api", "v1"] => Route::GroupVersion(String::new(), "v1".into()),
        ["openapi", "v3"] => Route::OpenApiRoot,
        ["openapi", "v3", "api", v] => Route::OpenApiGv(String::new(), (*v).to_string()),
        ["openapi", "v3", "apis", g, v] => Route::OpenApiGv((*g).to_string(), (*v).to_string()),
        ["apis", g] => Route::Group((*g).to_string()),
        ["apis", g, v] => Route::GroupVersion((*g).to_string(), (*v).to_string()),
        ["api", "v1", rest @ ..] => res_route("", "v1", rest),
        ["apis", g, v, rest @ ..] => res_route(g, v, rest),
        _ => Route::NotFound,
    }
}

fn res_route(group: &str, version: &str, rest: &[&str]) -> Route {
    let (watch_path, rest) = match rest.first() {
        Some(&"watch") => (true, &rest[1..]),
        _ => (false, rest),
    };
    let namespaced_target = rest.len() >= 3
        && rest[0] == "namespaces"
        && resources::lookup(group, version, rest[2]).is_some_and(|i| info(i).namespaced);
    let (ns, plural, name, sub) = if namespaced_target {
        (
            Some(rest[1]),
            rest[2],
            rest.get(3).copied(),
            rest.get(4).copied(),
        )
    } else {
        match rest.first() {
            Some(p) => (None, *p, rest.get(1).copied(), rest.get(2).copied()),
            None => return Route::NotFound,
        }
    };
    let max = if namespaced_target { 5 } else { 3 };
    if rest.len() > max {
        return Route::NotFound;
    }
    let Some(rid) = resources::lookup(group, version, plural) else {
        return Route::NotFound;
    };
    let r = info(rid);
    if r.namespaced && ns.is_none() && name.is_some() {
        return Route::NotFound;
    }
    let status = match sub {
        None => false,
        Some("status") if r.has_status => true,
        Some(_) => return Route::NotFound,
    };
    Route::Res(ResRoute {
        rid,
        ns: ns.map(str::to_string),
        name: name.map(str::to_string),
        status,
        watch_path,
    })
}

fn verb_of(method: &Method, r: &ResRoute, q: &Query) -> Option<Verb> {
    let watch = r.watch_path || q.flag("watch");
    Some(match (method.as_str(), r.name.is_some()) {
        ("GET", _) if watch => Verb::Watch,
        ("GET", true) => Verb::Get,
        ("GET", false) => Verb::List,
        ("POST", false) => Verb::Create,
        ("PUT", true) => Verb::Update,
        ("PATCH", true) => Verb::Patch,
        ("DELETE", true) => Verb::Delete,
        ("DELETE", false) => Verb::DeleteCollection,
        _ => return None,
    })
}

/// Accept loop. Ends when `shutdown` flips to true.
pub(crate) async fn serve(
    state: Arc<State>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut outage = state.faults.outage_watch();
    loop {
        let refusing = *outage.borrow_and_update() == Some(OutageKind::ConnectionRefused);
        if refusing {
            listener = None;
            conns.abort_all();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = outage.changed() => {}
            }
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => {
                let addr = *state.addr.lock().unwrap_or_else(|p| p.into_inner());
                match TcpListener::bind(addr).await {
                    Ok(l) => listener.insert(l),
                    Err(e) => {
                        tracing::warn!("re-binding {addr} after outage failed: {e}");
                        tokio::select! {
                            _ = shutdown.changed() => break,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                        continue;
                    }
                }
            }
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = outage.changed() => {}
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = l.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let st = state.clone();
                conns.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { handle(st, req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(io, svc)
                        .await;
                });
            }
        }
    }
    let _ = state.signals.send(Signal::Close);
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Abort> {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let q = Query::parse(&raw_query);
    if path == "/_fake" || path.starts_with("/_fake/") {
        return Ok(admin(&state, &method, &path, &q, req).await);
    }
    let header_str = |h: header::HeaderName| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let user_agent = header_str(header::USER_AGENT);
    let user = header_str(header::AUTHORIZATION).and_then(|a| {
        a.strip_prefix("Bearer ")
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    let content_type = header_str(header::CONTENT_TYPE);
    let accept = header_str(header::ACCEPT).unwrap_or_default();
    let rt = route(&path);
    let (verb, group, resource, ns, name) = match &rt {
        Route::Res(r) => {
            let i = info(r.rid);
            let res = if r.status {
                format!("{}/status", i.plural)
            } else {
                i.plural.to_string()
            };
            (
                verb_of(&method, r, &q),
                i.group.to_string(),
                Some(res),
                r.ns.clone(),
                r.name.clone(),
            )
        }
        _ => (None, String::new(), None, None, None),
    };
    let mut record = RequestRecord {
        seq: 0,
        method: method.to_string(),
        path: path.clone(),
        query: raw_query.clone(),
        verb,
        group: group.clone(),
        resource: resource.clone(),
        namespace: ns,
        name,
        label_selector: q.get("labelSelector").map(str::to_string),
        field_selector: q.get("fieldSelector").map(str::to_string),
        resource_version: q.get("resourceVersion").map(str::to_string),
        field_manager: q.get("fieldManager").map(str::to_string),
        content_type: content_type.clone(),
        user_agent: user_agent.clone(),
        user,
        status: 0,
        faulted: false,
        at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        micros: 0,
    };
    let decision = state.faults.check(verb, resource.as_deref(), &group);
    if !decision.delay.is_zero() {
        record.faulted = true;
        tokio::time::sleep(decision.delay).await;
    }
    if let Some(action) = decision.action {
        record.faulted = true;
        let resp = match action {
            FaultAction::Reset => {
                state.log.push(record);
                return Err(Abort);
            }
            FaultAction::Status { code } => {
                let (reason, msg) = match code {
                    500 => ("InternalError", "Internal error occurred: injected fault"),
                    503 => (
                        "ServiceUnavailable",
                        "the server is currently unable to handle the request",
                    ),
                    504 => (
                        "Timeout",
                        "the server was unable to return a response in the time allotted",
                    ),
                    409 => ("Conflict", "injected conflict"),
                    _ => ("InternalError", "injected fault"),
                };
                error_response(&ApiError::new(code, reason, msg))
            }
            FaultAction::TooManyRequests { retry_after_secs } => {
                let mut e = ApiError::new(
                    429,
                    "TooManyRequests",
                    "the server has received too many requests and has asked us to try again later",
                );
                e.details.retry_after = Some(retry_after_secs);
                error_response(&e)
            }
            FaultAction::Latency { .. } => error_response(&ApiError::internal("unreachable")),
        };
        record.status = resp.status().as_u16();
        state.log.push(record);
        return Ok(resp);
    }
    let default_manager = user_agent
        .as_deref()
        .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
        .unwrap_or_default();
    let resp = match rt {
        Route::Health => text_response(200, "ok"),
        Route::Version => json_response(200, &discovery::version()),
        Route::Api => {
            let addr = *state.addr.lock().unwrap_or_else(|p| p.into_inner());
            json_response(200, &discovery::api_versions(&addr.to_string()))
        }
        Route::Apis => json_response(200, &discovery::api_group_list()),
        Route::Group(g) => match discovery::api_group(&g) {
            Some(v) => json_response(200, &v),
            None => error_response(&ApiError::path_not_found()),
        },
        Route::GroupVersion(g, v) => match discovery::resource_list(&g, &v) {
            Some(v) => json_response(200, &v),
            None => error_response(&ApiError::path_not_found()),
        },
        Route::OpenApiRoot => json_response(200, &crate::openapi::root()),
        Route::OpenApiGv(g, v) => match crate::openapi::group_version(&g, &v) {
            Some(doc) => json_response(200, &doc),
            None => error_response(&ApiError::path_not_found()),
        },
        Route::NotFound => error_response(&ApiError::path_not_found()),
        Route::Res(r) => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let ctx = Ctx {
                q: &q,
                content_type: content_type.as_deref().unwrap_or(""),
                accept: &accept,
                default_manager,
            };
            match verb {
                None => error_response(&ApiError::method_not_allowed(method.as_str())),
                Some(v) => match resource_request(&state, &r, v, &ctx, &body).await {
                    Ok(resp) => resp,
                    Err(e) => error_response(&e),
                },
            }
        }
    };
    record.status = resp.status().as_u16();
    record.micros = started.elapsed().as_micros() as u64;
    state.log.push(record);
    Ok(resp)
}

struct Ctx<'a> {
    q: &'a Query,
    content_type: &'a str,
    accept: &'a str,
    default_manager: String,
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    if content_type.contains("yaml") {
        serde_saphyr::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice::<Value>(body).or_else(|e| {
            serde_saphyr::from_slice::<Value>(body)
                .map_err(|_| ApiError::bad_request(format!("error decoding JSON: {e}")))
        })
    }
}

fn write_opts(ctx: &Ctx<'_>) -> WriteOpts {
    WriteOpts {
        dry_run: ctx.q.get("dryRun").is_some_and(|v| v == "All"),
        field_manager: ctx.q.get("fieldManager").map(str::to_string),
        default_manager: ctx.default_manager.clone(),
        force: ctx.q.flag("force"),
    }
}

fn list_opts(rid: ResourceId, ns: Option<String>, q: &Query) -> Result<ListOpts, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""), info(rid))?;
    let limit = match q.get("limit") {
        Some(l) if !l.is_empty() => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {l}")))?,
        ),
        _ => None,
    };
    Ok(ListOpts {
        namespace: ns,
        labels,
        fields,
        limit,
        continue_token: q.get("continue").map(str::to_string),
    })
}

async fn resource_request(
    state: &Arc<State>,
    r: &ResRoute,
    verb: Verb,
    ctx: &Ctx<'_>,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    let res = info(r.rid);
    let ns = r.ns.as_deref();
    if ctx.content_type.contains("protobuf") && !res.virtual_create_only {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the fake apiserver only accepts JSON and YAML request bodies",
        ));
    }
    if res.virtual_create_only {
        return match verb {
            Verb::Create => {
                let obj = if ctx.content_type.contains("protobuf") {
                    crate::proto::decode_ssar(body).ok_or_else(|| {
                        ApiError::bad_request("cannot decode protobuf SelfSubjectAccessReview")
                    })?
                } else {
                    parse_body(body, ctx.content_type)?
                };
                Ok(json_response(201, &access_review(state, obj)))
            }
            _ => Err(ApiError::method_not_allowed(verb.as_str())),
        };
    }
    let table = ctx.accept.contains("as=Table");
    match verb {
        Verb::Get => {
            let obj = state
                .store
                .lock()
                .await
                .get(r.rid, ns, r.name.as_deref().unwrap_or(""))?;
            if table {
                return Ok(json_response(200, &crate::table::table(res, &[obj], None)));
            }
            Ok(json_response(200, &obj))
        }
        Verb::List => {
            let lo = list_opts(r.rid, r.ns.clone(), ctx.q)?;
            // serialize outside the lock, without cloning the objects
            let (items, metadata) = state.store.lock().await.list_shared(r.rid, &lo)?;
            if table {
                let items: Vec<Value> = items.iter().map(|v| (**v).clone()).collect();
                return Ok(json_response(
                    200,
                    &crate::table::table(res, &items, Some(&metadata)),
                ));
            }
            Ok(list_response(res, &items, &metadata))
        }
        Verb::Watch => watch(state, r, ctx).await,
        Verb::Create => {
            let obj = parse_body(body, ctx.content_type)?;
            if r.status {
                return Err(ApiError::method_not_allowed("POST"));
            }
            let out = state
                .store
                .lock()
                .await
                .create(r.rid, ns, obj, &write_opts(ctx))?;
            Ok(json_response(201, &out))
        }
        Verb::Update => {
            let obj = parse_body(body, ctx.content_type)?;
            let name = r.name.as_deref().unwrap_or("");
            let out = state.store.lock().await.update(
                r.rid,
                ns,
                name,
                obj,
                r.status,
                &write_opts(ctx),
            )?;
            Ok(json_response(200, &out))
        }
        Verb::Patch => {
            let ptype = PatchType::from_content_type(ctx.content_type).ok_or_else(|| {
                ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json; got {:?}",
                        ctx.content_type
                    ),
                )
            })?;
            let patch = parse_body(body, ctx.content_type)?;
            let name = r.name.as_deref().unwrap_or("");
            let (out, created) = state.store.lock().await.patch(
                r.rid,
                ns,
                name,
                ptype,
                &patch,
                r.status,
                &write_opts(ctx),
            )?;
            Ok(json_response(if created { 201 } else { 200 }, &out))
        }
        Verb::Delete | Verb::DeleteCollection => {
            let mut dopts = DeleteOpts {
                dry_run: ctx.q.get("dryRun").is_some_and(|v| v == "All"),
                ..Default::default()
            };
            if !body.iter().all(u8::is_ascii_whitespace) {
                let v = parse_body(body, "application/json")?;
                if let Some(p) = v.get("preconditions") {
                    dopts.uid = p.get("uid").and_then(Value::as_str).map(str::to_string);
                    dopts.resource_version = p
                        .get("resourceVersion")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                }
                if let Some(d) = v.get("dryRun").and_then(Value::as_array) {
                    if d.iter().any(|x| x == "All") {
                        dopts.dry_run = true;
                    }
                }
            }
            if verb == Verb::DeleteCollection {
                let lo = list_opts(r.rid, r.ns.clone(), ctx.q)?;
                let out = state
                    .store
                    .lock()
                    .await
                    .delete_collection(r.rid, &lo, &dopts)?;
                return Ok(json_response(200, &out));
            }
            let name = r.name.as_deref().unwrap_or("");
            match state.store.lock().await.delete(r.rid, ns, name, &dopts)? {
                DeleteOutcome::Pending(obj) => Ok(json_response(200, &obj)),
                DeleteOutcome::Deleted(obj) => {
                    let mut details = json!({
                        "name": name,
                        "kind": res.plural,
                        "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null),
                    });
                    if !res.group.is_empty() {
                        details["group"] = json!(res.group);
                    }
                    Ok(json_response(
                        200,
                        &json!({
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Success",
                            "details": details,
                        }),
                    ))
                }
            }
        }
    }
}

fn access_review(state: &State, mut obj: Value) -> Value {
    if !obj.is_object() {
        obj = json!({});
    }
    let attrs = obj
        .pointer("/spec/resourceAttributes")
        .cloned()
        .unwrap_or(json!({}));
    let verb = attrs.get("verb").and_then(Value::as_str).unwrap_or("");
    let resource = attrs.get("resource").and_then(Value::as_str).unwrap_or("");
    let denied = state.deny_rules().iter().any(|d| {
        (d.verb == "*" || d.verb == verb) && (d.resource == "*" || d.resource == resource)
    });
    obj["apiVersion"] = json!("authorization.k8s.io/v1");
    obj["kind"] = json!("SelfSubjectAccessReview");
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]["creationTimestamp"] = Value::Null;
    obj["status"] = if denied {
        json!({"allowed": false, "denied": true, "reason": "denied by fake apiserver rule"})
    } else {
        json!({"allowed": true, "reason": "fake apiserver allows everything"})
    };
    obj
}

/// Per-watch filter: resource, namespace, selectors.
struct WatchFilter {
    rid: ResourceId,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.ns {
            let ons = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if ons != ns {
                return false;
            }
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// Translate a store event for this watcher (selector transitions as the watch cache does).
    fn translate(&self, e: &Event) -> Option<(&'static str, Value)> {
        if e.resource != self.rid {
            return None;
        }
        let cur = self.matches(&e.object);
        match e.kind {
            EventType::Added => cur.then(|| ("ADDED", (*e.object).clone())),
            EventType::Deleted => cur.then(|| ("DELETED", (*e.object).clone())),
            EventType::Modified => {
                let old = e.prev.as_ref().is_some_and(|p| self.matches(p));
                match (old, cur) {
                    (true, true) => Some(("MODIFIED", (*e.object).clone())),
                    (false, true) => Some(("ADDED", (*e.object).clone())),
                    (true, false) => {
                        let mut prev = e
                            .prev
                            .as_ref()
                            .map(|p| (**p).clone())
                            .unwrap_or(Value::Null);
                        if let Some(Value::Object(m)) = prev.get_mut("metadata") {
                            m.insert("resourceVersion".into(), json!(e.rv.to_string()));
                        }
                        Some(("DELETED", prev))
                    }
                    (false, false) => None,
                }
            }
        }
    }
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark_line(rid: ResourceId, rv: u64, initial_end: bool) -> Bytes {
    let res = info(rid);
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": res.kind, "apiVersion": res.api_version(), "metadata": meta}),
    )
}

fn expired_line(rv: &str, oldest: u64) -> Bytes {
    let e = ApiError::expired(format!("too old resource version: {rv} ({oldest})"));
    event_line("ERROR", &e.to_status())
}

async fn watch(
    state: &Arc<State>,
    r: &ResRoute,
    ctx: &Ctx<'_>,
) -> Result<Response<Body>, ApiError> {
    let res = info(r.rid);
    let q = ctx.q;
    let mut lo = list_opts(r.rid, r.ns.clone(), q)?;
    if let Some(name) = &r.name {
        // legacy /watch/.../name form
        lo.fields.reqs.push(crate::selector::FieldReq {
            field: "metadata.name".into(),
            value: name.clone(),
            negate: false,
        });
    }
    let filter = WatchFilter {
        rid: r.rid,
        ns: if res.namespaced { r.ns.clone() } else { None },
        labels: lo.labels,
        fields: lo.fields,
    };
    let table = ctx.accept.contains("as=Table");
    let line = move |t: &str, o: &Value| -> Bytes {
        if table {
            event_line(t, &crate::table::table(res, std::slice::from_ref(o), None))
        } else {
            event_line(t, o)
        }
    };
    let allow_bookmarks = q.flag("allowWatchBookmarks");
    let send_initial = q.flag("sendInitialEvents");
    let rv_param = q.get("resourceVersion").unwrap_or("").to_string();
    let timeout = match q.get("timeoutSeconds") {
        Some(t) if !t.is_empty() => {
            Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid timeoutSeconds: {t}"))
            })?))
        }
        _ => None,
    };
    let mut initial: Vec<Bytes> = Vec::new();
    let mut terminal = false;
    let (sub, start_rv) = {
        let store = state.store.lock().await;
        let sub = store.subscribe();
        let cur = store.resource_version();
        if state.faults.take_watch_expiry(&rv_param) {
            initial.push(expired_line(&rv_param, store.compacted_rv() + 1));
            terminal = true;
        } else if send_initial || rv_param.is_empty() || rv_param == "0" {
            for obj in store.select(r.rid, filter.ns.as_deref(), &filter.labels) {
                if filter.matches(&obj) {
                    initial.push(line("ADDED", &obj));
                }
            }
            if send_initial {
                initial.push(bookmark_line(r.rid, cur, true));
            }
        } else {
            let from: u64 = rv_param.parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: \"{rv_param}\": strconv.ParseUint: parsing \"{rv_param}\": invalid syntax"
                ))
            })?;
            match store.events_after(from) {
                None => {
                    initial.push(expired_line(&rv_param, store.compacted_rv() + 1));
                    terminal = true;
                }
                Some(evs) => {
                    for e in evs {
                        if let Some((t, o)) = filter.translate(&e) {
                            initial.push(line(t, &o));
                        }
                    }
                }
            }
        }
        (sub, cur)
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let interval = state.opts.bookmark_interval;
    let rid = r.rid;
    let faults = state.faults.clone();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if terminal {
            return;
        }
        let mut sub = sub;
        let mut last_rv = start_rv;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => futures::future::pending::<()>().await,
                    }
                } => return,
                _ = tick.tick(), if allow_bookmarks => {
                    if tx.send(bookmark_line(rid, last_rv, false)).await.is_err() { return; }
                }
                sig = sub.recv() => match sig {
                    Ok(Signal::Event(e)) => {
                        if e.rv <= last_rv { continue; }
                        last_rv = e.rv;
                        if let Some((t, o)) = filter.translate(&e) {
                            let lag = faults.current_watch_lag();
                            if !lag.is_zero() {
                                tokio::time::sleep(lag).await;
                            }
                            if tx.send(line(t, &o)).await.is_err() { return; }
                        }
                    }
                    Ok(Signal::Bookmark) => {
                        if allow_bookmarks && tx.send(bookmark_line(rid, last_rv, false)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Signal::Close) | Err(broadcast::error::RecvError::Closed) => return,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(expired_line(&last_rv.to_string(), last_rv + 1)).await;
                        return;
                    }
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

async fn admin(
    state: &Arc<State>,
    method: &Method,
    path: &str,
    q: &Query,
    req: Request<Incoming>,
) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let sub = path.trim_start_matches("/_fake").trim_matches('/');
    match (method.as_str(), sub) {
        ("GET", "requests") => json_response(
            200,
            &serde_json::to_value(state.log.all()).unwrap_or(Value::Null),
        ),
        ("DELETE", "requests") => {
            state.log.clear();
            json_response(200, &json!({}))
        }
        ("GET", "faults") => json_response(
            200,
            &serde_json::to_value(state.faults.rules()).unwrap_or(Value::Null),
        ),
        ("POST", "faults") => match serde_json::from_slice::<FaultRule>(&body) {
            Ok(rule) => json_response(200, &json!({"id": state.faults.inject(rule)})),
            Err(e) => error_response(&ApiError::bad_request(format!("bad fault rule: {e}"))),
        },
        ("DELETE", "faults") => {
            state.faults.clear();
            json_response(200, &json!({}))
        }
        ("POST", "drop-watches") => {
            state.faults.drop_watches();
            json_response(200, &json!({}))
        }
        ("POST", "expire-watch") => {
            state.faults.expire_next_watch(q.get("resourceVersion"));
            json_response(200, &json!({}))
        }
        ("POST", "bookmarks") => {
            let _ = state.signals.send(Signal::Bookmark);
            json_response(200, &json!({}))
        }
        ("POST", "compact") => {
            state.store.lock().await.compact();
            json_response(200, &json!({}))
        }
        ("POST", "outage") => {
            let kind = match q.get("kind") {
                Some("refused") | Some("connectionRefused") => OutageKind::ConnectionRefused,
                _ => OutageKind::ServiceUnavailable,
            };
            state.faults.outage(kind);
            if let Some(secs) = q.get("seconds").and_then(|s| s.parse::<u64>().ok()) {
                let faults = state.faults.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    faults.end_outage();
                });
            }
            json_response(200, &json!({}))
        }
        ("DELETE", "outage") => {
            state.faults.end_outage();
            json_response(200, &json!({}))
        }
        _ => error_response(&ApiError::path_not_found()),
    }
}
