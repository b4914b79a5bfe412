//! Feature layer: the console's pages and forms. Each handler asks the gRPC services
//! (`AgentsApi`, `CommandsApi`) with the viewer as caller, then renders what they answered.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use askama::Template;
use axum::extract::{Path, Query, State as Shared};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use http::{StatusCode, header};
use serde::Deserialize;
use tether_api::v1;
use tether_api::v1::agents_server::Agents as _;
use tether_api::v1::commands_server::Commands as _;

use crate::console::{SameOrigin, State, Viewer, live, login};
use crate::northbound::auth::{Caller, TenantScope};
use crate::relay::Relay;
use crate::relay::outcomes::{self, Tally};

/// Agents on one page of the fleet.
pub const PAGE_SIZE: usize = 50;

const SCRIPT: &str = include_str!("static/console.js");
const STYLE: &str = include_str!("static/console.css");

pub(super) fn routes() -> Router<State> {
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(fleet))
        .route("/ui/login", get(login))
        .route("/ui/logout", post(logout))
        .route("/ui/agents/{tenant}/{name}", get(agent))
        .route("/ui/agents/{tenant}/{name}/revoke", post(revoke))
        .route("/ui/agents/{tenant}/{name}/commands", post(submit))
        .route("/ui/commands", get(commands))
        .route("/ui/commands/{id}", get(command))
        .route("/ui/tenants", get(tenants))
        .route("/ui/events/fleet", get(live::fleet))
        .route("/ui/events/agents/{tenant}/{name}", get(live::agent))
        .route("/ui/events/commands", get(live::commands))
        .route("/ui/events/commands/{id}", get(live::command))
        .route(
            "/ui/static/console.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT) }),
        )
        .route(
            "/ui/static/console.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE) }),
        )
        .fallback(|| async { error_page(StatusCode::NOT_FOUND, "no such page") })
}

// === Asking the API as the viewer ===

/// A request to a gRPC service as `caller`, exactly as `auth::Authenticated` hands it on.
pub(super) fn as_caller<T>(caller: &Caller, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.extensions_mut().insert(caller.clone());
    req
}

/// An API refusal as a page.
pub(super) fn status_page(s: tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_page(code, s.message())
}

#[derive(Template)]
#[template(path = "console/error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
    login: bool,
}

fn error_page(code: StatusCode, message: &str) -> Response {
    let page = ErrorPage {
        title: code.canonical_reason().unwrap_or("error"),
        message,
        login: code == StatusCode::UNAUTHORIZED,
    };
    (code, render(&page)).into_response()
}

/// 401: who is looking is not known.
pub(super) fn login_required() -> Response {
    error_page(
        StatusCode::UNAUTHORIZED,
        "not logged in, or the session expired: run `tetherctl console` and follow the link it prints",
    )
}

pub(super) fn render(t: &impl Template) -> Html<String> {
    Html(
        t.render()
            .unwrap_or_else(|e| format!("<p>rendering failed: {e}</p>")),
    )
}

// === What the pages show ===

fn when(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(t).ok())
}

/// `0 B`, `512 B`, `1.5 KiB`, `3.2 MiB`, `1.0 GiB`.
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3m ago`, `in 2h`, or `-`.
pub(super) fn relative(t: Option<SystemTime>, now: SystemTime) -> String {
    let Some(t) = t else { return "-".into() };
    let (d, past) = match now.duration_since(t) {
        Ok(d) => (d, true),
        Err(e) => (e.duration(), false),
    };
    let s = d.as_secs();
    let text = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    };
    if past {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

fn rfc3339(t: Option<SystemTime>) -> String {
    t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "-".into())
}

/// One session as the pages show it.
#[derive(Debug, Clone)]
pub struct SessionRow {
    /// Session id.
    pub id: String,
    /// `quic` or `tcp`.
    pub transport: String,
    /// The address the agent came from.
    pub remote: String,
    /// The gateway replica holding it (`-` without replicas).
    pub replica: String,
    /// Connected since (relative).
    pub since: String,
    /// Last heartbeat round trip.
    pub rtt: String,
    /// The certificate's expiry (relative).
    pub cert_expires: String,
    /// The agent process.
    pub instance: String,
    /// `direct`, `HTTP proxy`, or `-` (an agent too old to say).
    pub proxy: &'static str,
}

/// One agent as the pages show it.
#[derive(Debug, Clone)]
pub struct AgentRow {
    /// `<tenant>/<agent>`.
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its name within the tenant.
    pub name: String,
    /// Labels of its newest session, `k=v`.
    pub labels: Vec<String>,
    /// Agent version of its newest session (`-` offline).
    pub version: String,
    /// `current`, `behind`, `unsupported` or empty (offline).
    pub skew: &'static str,
    /// `online`, `degraded` or `offline`.
    pub status: &'static str,
    /// Why degraded.
    pub why: String,
    /// Last seen (relative).
    pub last_seen: String,
    /// Live sessions.
    pub sessions: Vec<SessionRow>,
    /// The earliest certificate expiry among its sessions (relative).
    pub cert_expires: String,
    /// Calls and TCP streams this gateway relays to it now.
    pub open_streams: u32,
    /// Relayed calls and TCP streams to it that ended, since the gateway started.
    pub calls: u64,
    /// Of those, the ones that did not end `OK`.
    pub failed: u64,
    /// Those calls by status code name, the codes seen only.
    pub codes: Vec<(String, u64)>,
    /// Bytes relayed caller → agent (request bodies, TCP bytes), since the gateway started.
    pub bytes_to_agent: u64,
    /// Bytes relayed agent → caller.
    pub bytes_from_agent: u64,
    /// Its allow-listed services, `(name, kind)`, as its newest session announced them.
    pub services: Vec<(String, String)>,
}

/// What the fleet's filters and counts need of an agent, read from the API's answer without
/// copying it: with 10,000 agents, only the rows of the page shown are rendered.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The agent, as the API answered.
    pub agent: &'a v1::Agent,
    /// Its newest session (labels and version come from it).
    pub newest: Option<&'a v1::Session>,
    /// `online`, `degraded` or `offline`.
    pub status: &'static str,
    /// `current`, `behind`, `unsupported` or empty (offline).
    pub skew: &'static str,
    /// The earliest certificate expiry among its sessions.
    pub earliest_expiry: Option<SystemTime>,
    /// An agent process of it holding fewer sessions than it wants: `(held, wanted)`.
    pub short: Option<(usize, u32)>,
}

/// The first agent process among `sessions` that holds fewer sessions than it says it wants
/// (`Session.sessions_wanted`; 0, unknown, never counts): `(held, wanted)`.
pub fn short_of_sessions(sessions: &[v1::Session]) -> Option<(usize, u32)> {
    sessions.iter().find_map(|s| {
        let mine = sessions.iter().filter(|o| o.instance_id == s.instance_id);
        let wanted = mine.clone().map(|o| o.sessions_wanted).max().unwrap_or(0);
        let held = mine.count();
        (held < wanted as usize).then_some((held, wanted))
    })
}

impl<'a> Facts<'a> {
    /// Of `a`, as of `now`.
    pub fn new(a: &'a v1::Agent, now: SystemTime) -> Facts<'a> {
        let newest = a.sessions.iter().max_by_key(|s| {
            s.connected_at
                .map(|t| (t.seconds, t.nanos))
                .unwrap_or_default()
        });
        let skew = newest
            .and_then(|s| v1::VersionSkew::try_from(s.version_skew).ok())
            .map(crate::tunnel::version::skew_name)
            .unwrap_or("");
        let earliest_expiry = a
            .sessions
            .iter()
            .filter_map(|s| when(&s.certificate_expires))
            .min();
        let expired = earliest_expiry.is_some_and(|e| e <= now);
        let short = short_of_sessions(&a.sessions);
        // Paused by the data plane's owner (its kill switch): up, but refusing every call.
        // Fewer sessions than wanted: a replica refuses it, or a path to one is failing (a
        // session whose probes fail is closed, so it shows here).
        let degraded = expired || skew == "unsupported" || a.paused || short.is_some();
        let status = match (a.connected, degraded) {
            (false, _) => "offline",
            (true, false) => "online",
            (true, true) => "degraded",
        };
        Facts {
            agent: a,
            newest,
            status,
            skew,
            earliest_expiry,
            short,
        }
    }

    /// Whether its version is older than the gateway's release (or outside the skew).
    pub fn outdated(&self) -> bool {
        matches!(self.skew, "behind" | "unsupported")
    }

    fn version(&self) -> &'a str {
        self.newest.map_or("-", |s| s.agent_version.as_str())
    }

    fn has_label(&self, label: &str) -> bool {
        let Some(s) = self.newest else { return false };
        match label.split_once('=') {
            Some((k, v)) => s.labels.get(k).is_some_and(|x| x == v),
            None => s.labels.contains_key(label),
        }
    }
}

/// The facts of `agents`, by id.
pub fn facts_of(agents: &[v1::Agent], now: SystemTime) -> Vec<Facts<'_>> {
    let mut facts: Vec<Facts<'_>> = agents.iter().map(|a| Facts::new(a, now)).collect();
    facts.sort_unstable_by(|a, b| a.agent.id.cmp(&b.agent.id));
    facts
}

impl AgentRow {
    /// From the API's view of an agent.
    pub fn new(a: &v1::Agent, now: SystemTime) -> AgentRow {
        let facts = Facts::new(a, now);
        let (newest, skew, status) = (facts.newest, facts.skew, facts.status);
        let earliest = facts.earliest_expiry;
        let mut why: Vec<String> = Vec::new();
        if a.paused {
            let reason = a
                .sessions
                .iter()
                .find(|s| s.paused)
                .map(|s| s.pause_reason.as_str())
                .unwrap_or("");
            why.push(format!("paused by the data plane's owner: {reason}"));
        }
        if earliest.is_some_and(|e| e <= now) {
            why.push("a session's certificate expired (renewal failing)".into());
        }
        if skew == "unsupported" {
            why.push("version outside the supported skew".into());
        }
        if let Some((held, wanted)) = facts.short {
            why.push(format!("holds {held} of the {wanted} sessions it wants"));
        }
        AgentRow {
            id: a.id.clone(),
            tenant: a.tenant.clone(),
            name: a.name.clone(),
            labels: newest
                .map(|s| {
                    let mut l: Vec<String> =
                        s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    l.sort();
                    l
                })
                .unwrap_or_default(),
            version: newest
                .map(|s| s.agent_version.clone())
                .unwrap_or_else(|| "-".into()),
            skew,
            status,
            why: why.join("; "),
            last_seen: if a.connected {
                "now".into()
            } else {
                relative(when(&a.last_seen), now)
            },
            sessions: a
                .sessions
                .iter()
                .map(|s| SessionRow {
                    id: s.session_id.clone(),
                    transport: s.transport.clone(),
                    remote: s.remote_addr.clone(),
                    replica: if s.replica.is_empty() {
                        "-".into()
                    } else {
                        s.replica.clone()
                    },
                    since: relative(when(&s.connected_at), now),
                    rtt: s
                        .rtt
                        .and_then(|d| Duration::try_from(d).ok())
                        .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
                        .unwrap_or_else(|| "-".into()),
                    cert_expires: relative(when(&s.certificate_expires), now),
                    instance: s.instance_id.clone(),
                    proxy: match v1::ProxyUse::try_from(s.proxy) {
                        Ok(v1::ProxyUse::ProxyDirect) => "direct",
                        Ok(v1::ProxyUse::ProxyHttp) => "HTTP proxy",
                        _ => "-",
                    },
                })
                .collect(),
            cert_expires: relative(earliest, now),
            open_streams: 0,
            calls: 0,
            failed: 0,
            codes: Vec::new(),
            bytes_to_agent: a.relayed_bytes_to_agent,
            bytes_from_agent: a.relayed_bytes_from_agent,
            services: newest
                .map(|s| {
                    s.services
                        .iter()
                        .map(|e| (e.name.clone(), e.kind.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// With what `relay` says of it: its streams open now, how its calls ended.
    pub fn with_relay(self, relay: &Relay) -> AgentRow {
        let traffic = relay.outcomes().traffic(&self.id);
        let mut row = self.with_outcomes(&traffic.tally);
        row.bytes_to_agent = traffic.bytes_to_agent;
        row.bytes_from_agent = traffic.bytes_from_agent;
        if let Ok(id) = row.id.parse::<tunnel_proto::AgentId>() {
            row.open_streams = relay.open_streams(&id);
        }
        row
    }

    /// Bytes relayed to it, for display.
    pub fn to_agent_text(&self) -> String {
        bytes_text(self.bytes_to_agent)
    }

    /// Bytes relayed from it, for display.
    pub fn from_agent_text(&self) -> String {
        bytes_text(self.bytes_from_agent)
    }

    /// With the outcomes of the calls relayed to it.
    pub fn with_outcomes(mut self, t: &Tally) -> AgentRow {
        self.calls = outcomes::total(t);
        self.failed = outcomes::failed(t);
        self.codes = t
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (format!("{:?}", tonic::Code::from(i as i32)), *n))
            .collect();
        self
    }
}

/// The fleet page's filters (its query string).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FleetFilter {
    /// Only this tenant.
    pub tenant: String,
    /// Only agents with this label: `key=value`, or `key` for any value.
    pub label: String,
    /// Only this version, or `outdated` (behind or unsupported).
    pub version: String,
    /// `online`, `degraded` or `offline`.
    pub status: String,
    /// Page, from 1.
    pub page: Option<usize>,
}

impl FleetFilter {
    /// Whether an agent with `facts` passes.
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        (self.tenant.is_empty() || facts.agent.tenant == self.tenant)
            && (self.label.is_empty() || facts.has_label(&self.label))
            && (self.version.is_empty()
                || facts.version() == self.version
                || (self.version == "outdated" && facts.outdated()))
            && (self.status.is_empty() || facts.status == self.status)
    }

    /// The query string of these filters (without the page).
    pub fn query(&self) -> String {
        let mut q = form_urlencoded_pairs(&[
            ("tenant", &self.tenant),
            ("label", &self.label),
            ("version", &self.version),
            ("status", &self.status),
        ]);
        if q.is_empty() {
            q.push_str("all=1");
        }
        q
    }
}

fn form_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The counts at the top of the fleet page: of every agent the viewer may see.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Agents.
    pub total: usize,
    /// Online.
    pub online: usize,
    /// Degraded.
    pub degraded: usize,
    /// Offline.
    pub offline: usize,
    /// Behind or unsupported versions.
    pub outdated: usize,
    /// Passing the page's filters.
    pub matching: usize,
}

impl Counts {
    /// Of `fleet`, `matching` of them passing the filters.
    pub fn of(fleet: &[Facts<'_>], matching: usize) -> Counts {
        let mut c = Counts {
            total: fleet.len(),
            matching,
            ..Counts::default()
        };
        for r in fleet {
            match r.status {
                "online" => c.online += 1,
                "degraded" => c.degraded += 1,
                _ => c.offline += 1,
            }
            if r.outdated() {
                c.outdated += 1;
            }
        }
        c
    }
}

/// Every agent the viewer may see, as `Agents/List` answers the viewer.
pub(super) async fn fleet_list(
    console: &State,
    caller: &Caller,
) -> Result<Vec<v1::Agent>, tonic::Status> {
    Ok(console
        .agents
        .list(as_caller(caller, v1::ListAgentsRequest::default()))
        .await?
        .into_inner()
        .agents)
}

#[derive(Template)]
#[template(path = "console/fleet.html")]
struct FleetPage<'a> {
    viewer: &'a Caller,
    counts: Counts,
    rows: &'a [AgentRow],
    f: &'a FleetFilter,
    query: String,
    page: usize,
    pages: usize,
    since_ms: u128,
}

/// A fleet row, as the page and its live updates render it.
#[derive(Template)]
#[template(path = "console/row.html")]
pub struct RowFragment<'a> {
    /// The row.
    pub r: &'a AgentRow,
}

/// The counts, as the page and its live updates render them.
#[derive(Template)]
#[template(path = "console/counts.html")]
pub struct CountsFragment {
    /// The counts.
    pub counts: Counts,
}

/// The fleet page of `agents` (as `Agents/List` answered), split out so the benchmark
/// measures the very code: filters and counts read [`Facts`]; only the page's rows are built.
pub fn render_fleet(
    caller: &Caller,
    agents: &[v1::Agent],
    f: &FleetFilter,
    relay: &Relay,
    now: SystemTime,
) -> String {
    let fleet = facts_of(agents, now);
    let matching: Vec<&Facts<'_>> = fleet.iter().filter(|r| f.matches(r)).collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = f.page.unwrap_or(1).clamp(1, pages);
    let shown: Vec<AgentRow> = matching
        .iter()
        .skip((page - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .map(|r| AgentRow::new(r.agent, now).with_relay(relay))
        .collect();
    let counts = Counts::of(&fleet, matching.len());
    let since_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    FleetPage {
        viewer: caller,
        counts,
        rows: &shown,
        f,
        query: f.query(),
        page,
        pages,
        since_ms,
    }
    .render()
    .unwrap_or_else(|e| format!("rendering failed: {e}"))
}

async fn fleet(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Query(f): Query<FleetFilter>,
) -> Response {
    // Naming another tenant is refused (and audited) as `Agents/List` refuses it.
    if !f.tenant.is_empty()
        && let Err(s) = caller.authorize_tenant("tether.v1.Agents/List", &f.tenant, "")
    {
        return status_page(s);
    }
    match fleet_list(&console, &caller).await {
        Ok(agents) => Html(render_fleet(
            &caller,
            &agents,
            &f,
            &console.relay,
            SystemTime::now(),
        ))
        .into_response(),
        Err(s) => status_page(s),
    }
}

// === Login ===

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    code: String,
}

async fn login(Shared(console): Shared<State>, Query(q): Query<LoginQuery>) -> Response {
    match console.logins.redeem(&q.code, SystemTime::now()) {
        Ok(session) => {
            let caller = &session.caller;
            caller.audit_allowed_on("console/login", "", "", "console session started");
            let cookie = console.logins.set_cookie(&session);
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "/ui/".to_owned()),
                    (header::SET_COOKIE, cookie),
                ],
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(target: crate::northbound::auth::AUDIT_TARGET, decision = "deny",
                reason = %e, "console login refused");
            error_page(StatusCode::UNAUTHORIZED, &e.to_string())
        }
    }
}

async fn logout(_: SameOrigin) -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/ui/".to_owned()),
            (header::SET_COOKIE, login::clear_cookie()),
        ],
    )
        .into_response()
}

// === Agent ===

/// The agent page's live part: its detail.
#[derive(Template)]
#[template(path = "console/agent_detail.html")]
pub struct AgentDetail<'a> {
    /// The agent.
    pub r: &'a AgentRow,
}

/// A command as the pages show it.
#[derive(Debug, Clone)]
pub struct CommandRow {
    /// Its id.
    pub id: String,
    /// `<tenant>/<agent>`.
    pub agent: String,
    /// Kind.
    pub kind: String,
    /// State, lower case.
    pub state: String,
    /// Deliveries started.
    pub attempts: u32,
    /// Created (RFC 3339).
    pub created: String,
    /// Delivered.
    pub delivered: String,
    /// Started running.
    pub started: String,
    /// Finished.
    pub finished: String,
    /// Expires, if never delivered.
    pub expires: String,
    /// Last progress lines.
    pub progress: Vec<String>,
    /// The result's message.
    pub message: String,
    /// Output bytes.
    pub output_len: usize,
}

impl CommandRow {
    /// From the API's view of a command.
    pub fn new(c: &v1::Command) -> CommandRow {
        let state = v1::CommandState::try_from(c.state)
            .map(|s| s.as_str_name().to_ascii_lowercase())
            .unwrap_or_else(|_| "unknown".into());
        CommandRow {
            id: c.id.clone(),
            agent: c.agent.clone(),
            kind: c.kind.clone(),
            state,
            attempts: c.attempts,
            created: rfc3339(when(&c.created)),
            delivered: rfc3339(when(&c.delivered)),
            started: rfc3339(when(&c.started)),
            finished: rfc3339(when(&c.finished)),
            expires: rfc3339(when(&c.expires)),
            progress: c.progress.clone(),
            message: c
                .result
                .as_ref()
                .map(|r| r.message.clone())
                .unwrap_or_default(),
            output_len: c.result.as_ref().map_or(0, |r| r.output.len()),
        }
    }
}

/// An agent's recent commands, as its page and live updates render them.
#[derive(Template)]
#[template(path = "console/agent_commands.html")]
pub struct AgentCommands {
    /// Newest first.
    pub commands: Vec<CommandRow>,
}

#[derive(Template)]
#[template(path = "console/agent.html")]
struct AgentPage<'a> {
    viewer: &'a Caller,
    r: &'a AgentRow,
    commands: Vec<CommandRow>,
    enroll: String,
    notice: String,
}

pub(super) async fn agent_commands(
    console: &State,
    caller: &Caller,
    agent: &str,
) -> Result<Vec<CommandRow>, tonic::Status> {
    // Ids sort by submission: the newest are on the last page. Agents' command counts are
    // bounded by retention; read pages until the end, keeping the newest 20.
    let mut token = String::new();
    let mut newest: Vec<CommandRow> = Vec::new();
    for _ in 0..100 {
        let page = console
            .commands
            .list(as_caller(
                caller,
                v1::ListCommandsRequest {
                    agent: agent.to_owned(),
                    page_size: 1000,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner();
        newest.extend(page.commands.iter().map(CommandRow::new));
        if newest.len() > 20 {
            newest.drain(..newest.len() - 20);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    newest.reverse();
    Ok(newest)
}

pub(super) async fn agent_row(
    console: &State,
    caller: &Caller,
    id: &str,
) -> Result<AgentRow, tonic::Status> {
    let a = console
        .agents
        .get(as_caller(
            caller,
            v1::GetAgentRequest {
                agent: id.to_owned(),
            },
        ))
        .await?
        .into_inner();
    Ok(AgentRow::new(&a, SystemTime::now()).with_relay(&console.relay))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Notice {
    notice: String,
}

async fn agent(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Path((tenant, name)): Path<(String, String)>,
    Query(n): Query<Notice>,
) -> Response {
    let id = format!("{tenant}/{name}");
    let r = match agent_row(&console, &caller, &id).await {
        Ok(r) => r,
        Err(s) => return status_page(s),
    };
    let commands = match agent_commands(&console, &caller, &id).await {
        Ok(c) => c,
        Err(s) => return status_page(s),
    };
    let enroll = format!(
        "tetherctl tokens create {tenant} NEW-AGENT --ttl 1h   # prints TOKEN\n\
         TETHER_ENROLLMENT_TOKEN=TOKEN tether-agent run --config agent.toml   # agent.toml: gateway address, tls.ca, state_dir; trust domain {}",
        console.trust_domain
    );
    let page = AgentPage {
        viewer: &caller,
        r: &r,
        commands,
        enroll,
        notice: n.notice,
    };
    render(&page).into_response()
}

#[derive(Deserialize)]
struct RevokeForm {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    confirm: String,
}

async fn revoke(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    _: SameOrigin,
    Path((tenant, name)): Path<(String, String)>,
    Form(form): Form<RevokeForm>,
) -> Response {
    let id = format!("{tenant}/{name}");
    if form.confirm != id {
        return error_page(
            StatusCode::BAD_REQUEST,
            &format!("to revoke, type the agent's id ({id}) in the confirmation field"),
        );
    }
    if form.reason.trim().is_empty() {
        return error_page(StatusCode::BAD_REQUEST, "a revocation needs a reason");
    }
    // The gRPC method itself: its tenant check, its audit event.
    match console
        .agents
        .revoke(as_caller(
            &caller,
            v1::RevokeAgentRequest {
                agent: id.clone(),
                reason: form.reason,
            },
        ))
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let notice = format!(
                "revoked: {} session(s) closed, {} enrollment token(s) invalidated",
                r.sessions_closed, r.tokens_invalidated
            );
            Redirect::to(&format!(
                "/ui/agents/{}/{}?notice={}",
                urlencode(&tenant),
                urlencode(&name),
                urlencode(&notice)
            ))
            .into_response()
        }
        Err(s) => status_page(s),
    }
}

#[derive(Deserialize)]
struct SubmitForm {
    kind: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    idempotency_key: String,
}

async fn submit(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    _: SameOrigin,
    Path((tenant, name)): Path<(String, String)>,
    Form(form): Form<SubmitForm>,
) -> Response {
    let req = v1::SubmitCommandRequest {
        agent: format!("{tenant}/{name}"),
        kind: form.kind.trim().to_owned(),
        payload: form.payload.into_bytes(),
        idempotency_key: form.idempotency_key,
        ..Default::default()
    };
    match console.commands.submit(as_caller(&caller, req)).await {
        Ok(r) => {
            Redirect::to(&format!("/ui/commands/{}", urlencode(&r.into_inner().id))).into_response()
        }
        Err(s) => status_page(s),
    }
}

// === Commands ===

/// The commands page's filters (its query string).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct CommandFilter {
    pub(super) tenant: String,
    pub(super) agent: String,
    state: String,
    kind: String,
    /// `1h`, `30m`, `2d`: created within.
    since: String,
    page_token: String,
}

impl CommandFilter {
    /// The query string of these filters, the page included.
    fn query(&self) -> String {
        form_urlencoded_pairs(&[
            ("tenant", &self.tenant),
            ("agent", &self.agent),
            ("state", &self.state),
            ("kind", &self.kind),
            ("since", &self.since),
            ("page_token", &self.page_token),
        ])
    }
}

/// A row of the commands list, as the page and its live updates render it.
#[derive(Template)]
#[template(path = "console/command_row.html")]
pub struct CommandRowFragment<'a> {
    /// The command.
    pub c: &'a CommandRow,
}

#[derive(Template)]
#[template(path = "console/commands.html")]
struct CommandsPage<'a> {
    viewer: &'a Caller,
    f: &'a CommandFilter,
    commands: Vec<CommandRow>,
    next: String,
    states: &'static [&'static str],
    /// The page's filters, for its live updates.
    query: String,
}

const STATES: &[&str] = &[
    "queued",
    "delivered",
    "awaiting_approval",
    "running",
    "succeeded",
    "failed",
    "expired",
    "cancelled",
];

/// The commands `Commands/List` answers the viewer for the filters `f`, and the query of the
/// next page (empty on the last); a refusal as a page.
pub(super) async fn list_commands(
    console: &State,
    caller: &Caller,
    f: &CommandFilter,
) -> Result<(Vec<CommandRow>, String), Response> {
    let state = match f.state.as_str() {
        "" => 0,
        s => match v1::CommandState::from_str_name(&s.to_ascii_uppercase()) {
            Some(s) => s as i32,
            None => return Err(error_page(StatusCode::BAD_REQUEST, "unknown state")),
        },
    };
    let from = match f.since.trim() {
        "" => None,
        s => match humantime::parse_duration(s) {
            Ok(d) => Some((SystemTime::now() - d).into()),
            Err(e) => return Err(error_page(StatusCode::BAD_REQUEST, &format!("since: {e}"))),
        },
    };
    if !f.tenant.is_empty()
        && let Err(s) = caller.authorize_tenant("tether.v1.Commands/List", &f.tenant, "")
    {
        return Err(status_page(s));
    }
    let req = v1::ListCommandsRequest {
        agent: f.agent.clone(),
        state,
        kind: f.kind.clone(),
        from,
        to: None,
        page_size: 100,
        page_token: f.page_token.clone(),
    };
    let page = match console.commands.list(as_caller(caller, req)).await {
        Ok(p) => p.into_inner(),
        Err(s) => return Err(status_page(s)),
    };
    let commands = page
        .commands
        .iter()
        .filter(|c| {
            f.tenant.is_empty() || c.agent.split_once('/').is_some_and(|(t, _)| t == f.tenant)
        })
        .map(CommandRow::new)
        .collect();
    let next = if page.next_page_token.is_empty() {
        String::new()
    } else {
        form_urlencoded_pairs(&[
            ("tenant", &f.tenant),
            ("agent", &f.agent),
            ("state", &f.state),
            ("kind", &f.kind),
            ("since", &f.since),
            ("page_token", &page.next_page_token),
        ])
    };
    Ok((commands, next))
}

async fn commands(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Query(f): Query<CommandFilter>,
) -> Response {
    let (commands, next) = match list_commands(&console, &caller, &f).await {
        Ok(page) => page,
        Err(refused) => return refused,
    };
    render(&CommandsPage {
        viewer: &caller,
        f: &f,
        commands,
        next,
        states: STATES,
        query: f.query(),
    })
    .into_response()
}

/// A command's detail, as its page and live updates render it.
#[derive(Template)]
#[template(path = "console/command_detail.html")]
pub struct CommandDetail<'a> {
    /// The command.
    pub c: &'a CommandRow,
}

#[derive(Template)]
#[template(path = "console/command.html")]
struct CommandPage<'a> {
    viewer: &'a Caller,
    c: &'a CommandRow,
}

async fn command(
    Shared(console): Shared<State>,
    Viewer(caller): Viewer,
    Path(id): Path<String>,
) -> Response {
    let c = match console
        .commands
        .get(as_caller(&caller, v1::GetCommandRequest { id }))
        .await
    {
        Ok(c) => CommandRow::new(&c.into_inner()),
        Err(s) => return status_page(s),
    };
    render(&CommandPage {
        viewer: &caller,
        c: &c,
    })
    .into_response()
}

// === Tenants ===

/// One tenant's line on the tenants page.
#[derive(Debug, Default)]
struct TenantRow {
    name: String,
    agents: usize,
    online: usize,
    offline: usize,
    degraded: usize,
    outdated: usize,
    calls: u64,
    failed: u64,
    versions: Vec<(String, usize)>,
}

#[derive(Template)]
#[template(path = "console/tenants.html")]
struct TenantsPage<'a> {
    viewer: &'a Caller,
    tenants: Vec<TenantRow>,
}

async fn tenants(Shared(console): Shared<State>, Viewer(caller): Viewer) -> Response {
    let agents = match fleet_list(&console, &caller).await {
        Ok(a) => a,
        Err(s) => return status_page(s),
    };
    let rows = facts_of(&agents, SystemTime::now());
    let mut by: BTreeMap<String, (TenantRow, BTreeMap<String, usize>)> = BTreeMap::new();
    // Tenants the viewer acts for show even with no agent yet.
    if let TenantScope::Set(s) = &caller.tenants {
        for t in s {
            by.entry(t.clone()).or_default();
        }
    }
    for r in &rows {
        let (t, versions) = by.entry(r.agent.tenant.clone()).or_default();
        t.agents += 1;
        match r.status {
            "online" => t.online += 1,
            "degraded" => t.degraded += 1,
            _ => t.offline += 1,
        }
        if r.outdated() {
            t.outdated += 1;
        }
        let tally = console.relay.outcomes().of(&r.agent.id);
        t.calls += outcomes::total(&tally);
        t.failed += outcomes::failed(&tally);
        if r.version() != "-" {
            *versions.entry(r.version().to_owned()).or_default() += 1;
        }
    }
    let tenants = by
        .into_iter()
        .map(|(name, (mut t, versions))| {
            t.name = name;
            t.versions = versions.into_iter().collect();
            t
        })
        .collect();
    render(&TenantsPage {
        viewer: &caller,
        tenants,
    })
    .into_response()
}

/// `*` or the tenants, for the page header.
pub(super) fn scope_text(c: &Caller) -> String {
    match &c.tenants {
        TenantScope::All => "every tenant".into(),
        TenantScope::Set(s) => s.iter().cloned().collect::<Vec<_>>().join(", "),
    }
}

impl FleetPage<'_> {
    fn scope(&self) -> String {
        scope_text(self.viewer)
    }
}
impl AgentPage<'_> {
    fn scope(&self) -> String {
        scope_text(self.viewer)
    }
}
impl CommandsPage<'_> {
    fn scope(&self) -> String {
        scope_text(self.viewer)
    }
}
impl CommandPage<'_> {
    fn scope(&self) -> String {
        scope_text(self.viewer)
    }
}
impl TenantsPage<'_> {
    fn scope(&self) -> String {
        scope_text(self.viewer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, connected: bool, version: &str, labels: &[(&str, &str)]) -> v1::Agent {
        let (tenant, name) = id.split_once('/').unwrap();
        let now = SystemTime::now();
        v1::Agent {
            id: id.into(),
            tenant: tenant.into(),
            name: name.into(),
            connected,
            sessions: if connected {
                vec![v1::Session {
                    session_id: "s1".into(),
                    agent: id.into(),
                    transport: "quic".into(),
                    agent_version: version.into(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    connected_at: Some(now.into()),
                    certificate_expires: Some((now + Duration::from_secs(3600)).into()),
                    version_skew: v1::VersionSkew::Current as i32,
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            last_seen: Some(now.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_paused_agent_is_degraded_with_its_owners_reason() {
        let mut a = agent("acme/p", true, env!("CARGO_PKG_VERSION"), &[]);
        a.paused = true;
        a.sessions[0].paused = true;
        a.sessions[0].pause_reason = "maintenance window".into();
        let row = AgentRow::new(&a, SystemTime::now());
        assert_eq!(row.status, "degraded");
        assert!(
            row.why
                .contains("paused by the data plane's owner: maintenance window"),
            "{}",
            row.why
        );
    }

    #[test]
    fn fleet_filters_and_pages() {
        let now = SystemTime::now();
        let agents: Vec<v1::Agent> = (0..120)
            .map(|i| {
                agent(
                    &format!("t{}/a{i:03}", i % 2),
                    i % 3 != 0,
                    "0.1.0",
                    &[("region", if i % 4 == 0 { "eu" } else { "us" })],
                )
            })
            .collect();
        let rows = facts_of(&agents, now);
        let relay = Relay::with_stream_limit(Default::default(), 8);
        let f = FleetFilter {
            tenant: "t0".into(),
            status: "offline".into(),
            ..Default::default()
        };
        assert_eq!(rows.iter().filter(|r| f.matches(r)).count(), 20);
        let f = FleetFilter {
            label: "region=eu".into(),
            ..Default::default()
        };
        // Offline agents show no labels: only the online ones with region=eu.
        assert_eq!(rows.iter().filter(|r| f.matches(r)).count(), 20);
        let caller = Caller {
            name: "ops".into(),
            kind: crate::northbound::auth::CallerKind::Mtls,
            tenants: TenantScope::All,
        };
        let html = render_fleet(&caller, &agents, &FleetFilter::default(), &relay, now);
        assert_eq!(html.matches("<tr data-agent=").count(), PAGE_SIZE);
        assert!(
            html.contains("t0/a000"),
            "first page starts at the first id"
        );
        let page3 = FleetFilter {
            page: Some(3),
            ..Default::default()
        };
        let html = render_fleet(&caller, &agents, &page3, &relay, now);
        assert_eq!(html.matches("<tr data-agent=").count(), 20);
    }

    #[test]
    fn an_agent_process_with_fewer_sessions_than_it_wants_is_degraded() {
        let mut a = agent("acme/two", true, env!("CARGO_PKG_VERSION"), &[]);
        a.sessions[0].instance_id = "i1".into();
        a.sessions[0].sessions_wanted = 2;
        let row = AgentRow::new(&a, SystemTime::now());
        assert_eq!(row.status, "degraded");
        assert!(row.why.contains("1 of the 2 sessions"), "{}", row.why);
        // Its second session: online.
        let mut second = a.sessions[0].clone();
        second.session_id = "s2".into();
        a.sessions.push(second);
        assert_eq!(AgentRow::new(&a, SystemTime::now()).status, "online");
        // Another process of the same agent wanting one is not short of the first's two.
        let mut other = a.sessions[0].clone();
        other.session_id = "s3".into();
        other.instance_id = "i2".into();
        other.sessions_wanted = 1;
        a.sessions.push(other);
        assert_eq!(AgentRow::new(&a, SystemTime::now()).status, "online");
        // An agent too old to say (0) is never short.
        let mut old = agent("acme/old", true, env!("CARGO_PKG_VERSION"), &[]);
        old.sessions[0].sessions_wanted = 0;
        assert_eq!(AgentRow::new(&old, SystemTime::now()).status, "online");
    }

    #[test]
    fn the_agent_page_shows_services_proxy_and_bytes() {
        let mut a = agent("acme/p", true, env!("CARGO_PKG_VERSION"), &[]);
        a.sessions[0].proxy = v1::ProxyUse::ProxyHttp as i32;
        a.sessions[0].transport = "tcp".into();
        a.sessions[0].services = vec![v1::AgentService {
            name: "billing".into(),
            kind: "grpc".into(),
        }];
        let relay = Relay::with_stream_limit(Default::default(), 8);
        let t = relay.outcomes().agent(&"acme/p".parse().unwrap());
        t.to_agent(2048);
        t.from_agent(10);
        t.ended(tonic::Code::Ok);
        let r = AgentRow::new(&a, SystemTime::now()).with_relay(&relay);
        assert_eq!(
            (r.calls, r.bytes_to_agent, r.bytes_from_agent),
            (1, 2048, 10)
        );
        let html = AgentDetail { r: &r }.render().unwrap();
        assert!(html.contains(r#"data-service="billing""#), "{html}");
        assert!(html.contains("billing (grpc)"), "{html}");
        assert!(
            html.contains(r#"<td class="proxy">HTTP proxy</td>"#),
            "{html}"
        );
        assert!(
            html.contains("2.0 KiB to the agent, 10 B from it"),
            "{html}"
        );
        let row = RowFragment { r: &r }.render().unwrap();
        assert!(row.contains("tcp via HTTP proxy"), "{row}");
    }

    #[test]
    fn byte_counts_read_in_binary_units() {
        assert_eq!(bytes_text(0), "0 B");
        assert_eq!(bytes_text(1023), "1023 B");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(bytes_text(5 << 20), "5.0 MiB");
        assert_eq!(bytes_text(3 << 30), "3.0 GiB");
    }

    #[test]
    fn fragments_escape_what_agents_report() {
        let a = agent("t/a", true, "<script>x</script>", &[("k", "\"><img>")]);
        let r = AgentRow::new(&a, SystemTime::now());
        let html = RowFragment { r: &r }.render().unwrap();
        assert!(!html.contains("<script>x"), "{html}");
        assert!(!html.contains("<img>"), "{html}");
    }
}
