//! `tetherctl`'s command line: its flags, and what each command does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use crate::tools::ctl::{self, DEV_JSON, DevJson, Target};
use clap::{Parser, Subcommand, ValueEnum};
use tether_api::v1;
use tether_api::v1::agents_client::AgentsClient;

#[derive(Parser)]
#[command(
    name = "tetherctl",
    version,
    about = "Talk to a Tether gateway's northbound API"
)]
struct Cli {
    /// Northbound address host:port (default: from ./.tether/dev.json when present).
    #[arg(long, env = "TETHER_NORTHBOUND", global = true)]
    northbound: Option<String>,
    /// CA bundle for the gateway's certificate.
    #[arg(long, env = "TETHER_CA", global = true)]
    ca: Option<PathBuf>,
    /// Control-plane client certificate.
    #[arg(long, env = "TETHER_CLIENT_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, env = "TETHER_CLIENT_KEY", global = true)]
    key: Option<PathBuf>,
    /// TLS name to verify (default: the host of --northbound).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Bearer token (JWT) sent as `authorization` on every call, for gateways with [auth] keys;
    /// with it, --cert/--key are optional.
    #[arg(long, env = "TETHER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Where `tether-gateway dev` wrote its client details.
    #[arg(long, env = "TETHER_DEV_JSON", global = true, default_value = DEV_JSON)]
    dev_json: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Agents and their sessions.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Durable commands: submit, inspect, watch, cancel.
    #[command(subcommand)]
    Commands(CommandsCmd),
    /// Enrollment tokens: single-use bootstrap tokens for agents.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// Northbound callers (control-plane client certificates).
    #[command(subcommand)]
    Callers(CallersCmd),
    /// Call a gRPC method of a service behind an agent, with a JSON request; prints each reply
    /// as JSON. The message types come from the upstream's server reflection, through the
    /// tunnel.
    Call {
        /// The agent, <tenant>/<agent>.
        agent: String,
        /// <package.Service>/<Method>, e.g. tether.demo.v1.Echo/Unary.
        method: String,
        /// The request, as JSON.
        #[arg(long, short, default_value = "{}")]
        data: String,
        /// The agent's service to call (its `tether-service`; default: the agent's default
        /// service).
        #[arg(long)]
        service: Option<String>,
        /// Deadline of the call.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print a single-use login link for the web console (valid 60 s), acting as this caller
    /// for its tenants; opens it with $BROWSER when that is set.
    Console {
        /// Print the link only, even when $BROWSER is set.
        #[arg(long)]
        no_browser: bool,
    },
    /// Listen on a loopback port and carry each connection to an agent's TCP service.
    Forward {
        /// The agent, <tenant>/<agent>.
        agent: String,
        /// The agent's service (kind = "tcp" in its service map).
        service: String,
        /// Local port (0 picks a free one; the chosen port is printed).
        local_port: u16,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// List known agents.
    List {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only connected agents.
        #[arg(long)]
        connected: bool,
    },
    /// Show one agent (<tenant>/<agent>).
    Get { agent: String },
    /// Stream connect and disconnect events.
    Watch {
        #[arg(long)]
        tenant: Option<String>,
        /// Only this agent (<tenant>/<agent>).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Revoke an agent (<tenant>/<agent>): its certificates issued until now are refused from
    /// now on, its live sessions are closed, its pending enrollment tokens become invalid.
    Revoke {
        agent: String,
        /// Why (kept with the revocation and shown to the agent).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum TokensCmd {
    /// Create a single-use token an agent enrolls with (`enrollment.token`); printed once.
    Create {
        /// The tenant.
        tenant: String,
        /// The agent's name within the tenant.
        agent: String,
        /// How long the token may be used, e.g. 1h (default: the gateway's enrollment.token_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Subcommand)]
enum CallersCmd {
    /// Revoke a caller's certificates: by name (every certificate of
    /// spiffe://<td>/controlplane/<name> issued until now) and/or one certificate by its SHA-256
    /// fingerprint. Its open connections are closed; needs a caller acting for every tenant.
    Revoke {
        /// The caller's <name>.
        name: Option<String>,
        /// One certificate's SHA-256 fingerprint (hex, colons allowed).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Why (kept with the revocation).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

async fn callers_cmd(channel: ctl::Conn, cmd: CallersCmd, output: Output) -> Result<(), String> {
    let CallersCmd::Revoke {
        name,
        fingerprint,
        reason,
    } = cmd;
    if name.is_none() && fingerprint.is_none() {
        return Err("name a caller, or give --fingerprint".into());
    }
    let r = v1::callers_client::CallersClient::new(channel)
        .revoke(v1::RevokeCallerRequest {
            name: name.unwrap_or_default(),
            sha256_fingerprint: fingerprint.unwrap_or_default(),
            reason,
        })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Table => {
            let what = match (r.name.is_empty(), r.sha256_fingerprint.is_empty()) {
                (false, false) => format!(
                    "caller {} and certificate sha256:{}",
                    r.name, r.sha256_fingerprint
                ),
                (false, true) => format!("caller {}", r.name),
                _ => format!("certificate sha256:{}", r.sha256_fingerprint),
            };
            println!(
                "revoked {what} as of {}: {} connection(s) closed",
                match ts_json(&r.revoked_at) {
                    serde_json::Value::String(s) => s,
                    _ => "-".into(),
                },
                r.connections_closed
            );
            for fp in &r.closed_fingerprints {
                println!("  closed a connection of certificate sha256:{fp}");
            }
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "name": r.name,
                "sha256_fingerprint": r.sha256_fingerprint,
                "revoked_at": ts_json(&r.revoked_at),
                "connections_closed": r.connections_closed,
                "closed_fingerprints": r.closed_fingerprints,
            })
        ),
    }
    Ok(())
}

/// `tetherctl console`: asks for a login link, prints it, and opens it with `$BROWSER`.
async fn console(
    channel: ctl::Conn,
    addr: &str,
    no_browser: bool,
    output: Output,
) -> Result<(), String> {
    let link = v1::console_client::ConsoleClient::new(channel)
        .create_login_link(v1::CreateLoginLinkRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let url = format!("https://{addr}{}", link.path);
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "url": url,
                "expires_at": ts_json(&link.expires_at),
                "caller": link.caller,
                "tenants": link.tenants,
            })
        ),
        Output::Table => {
            println!("{url}");
            eprintln!(
                "console login for {} ({}): single use, valid 60 s",
                link.caller,
                link.tenants.join(", ")
            );
        }
    }
    if let (false, Some(browser)) = (no_browser, std::env::var_os("BROWSER"))
        && let Err(e) = std::process::Command::new(&browser)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
    {
        eprintln!(
            "could not start $BROWSER ({}): {e}",
            browser.to_string_lossy()
        );
    }
    Ok(())
}

async fn tokens_cmd(channel: ctl::Conn, cmd: TokensCmd, output: Output) -> Result<(), String> {
    let mut client = v1::enrollment_client::EnrollmentClient::new(channel);
    let TokensCmd::Create { tenant, agent, ttl } = cmd;
    let r = client
        .create_token(v1::CreateTokenRequest {
            tenant,
            agent,
            ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
        })
        .await
        .map_err(status)?
        .into_inner();
    match output {
        Output::Table => {
            println!("{}", r.token);
            eprintln!(
                "token for {} (single use), valid until {}; it is shown only now",
                r.agent,
                match ts_json(&r.expires_at) {
                    serde_json::Value::String(s) => s,
                    _ => "-".into(),
                }
            );
        }
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "token": r.token,
                "agent": r.agent,
                "expires_at": ts_json(&r.expires_at),
            })
        ),
    }
    Ok(())
}

#[derive(Subcommand)]
enum CommandsCmd {
    /// Queue a command for an agent; prints its id.
    Submit {
        /// The agent, <tenant>/<agent>.
        agent: String,
        /// The handler kind (`echo`, `sleep`, ...).
        kind: String,
        /// Payload text (or use --payload-file).
        #[arg(default_value = "")]
        payload: String,
        /// Read the payload from this file (`-` for stdin).
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Content type of the payload.
        #[arg(long, default_value = "text/plain")]
        content_type: String,
        /// Same key, same agent: the same command comes back and nothing new is queued.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Expire if not delivered within this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Commands with the same key run one after another.
        #[arg(long, default_value = "")]
        ordering_key: String,
        /// Then watch it to completion.
        #[arg(long, short)]
        watch: bool,
    },
    /// Show one command.
    Get { id: String },
    /// List commands, oldest first.
    List {
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only this state (queued, delivered, running, succeeded, failed, expired, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue from a previous page's token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Follow state transitions and progress live: of one command (until it ends) or of every
    /// command of an agent (--agent).
    Watch {
        /// The command id.
        id: Option<String>,
        /// Watch every command of this agent instead.
        #[arg(long, conflicts_with = "id")]
        agent: Option<String>,
    },
    /// Cancel a command that was not delivered yet.
    Cancel { id: String },
}

/// A failed call in words: the gateway's status code and message, and for a connection that
/// broke (tonic's bare `transport error`) what broke it.
fn status(s: tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(source) = s.source() {
        let more = tether_runtime::report::chain(source);
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
    }
    text
}

fn state_of(c: &v1::Command) -> String {
    c.state().as_str_name().to_lowercase()
}

fn result_text(c: &v1::Command) -> String {
    match &c.result {
        None => String::new(),
        Some(r) if !r.message.is_empty() => r.message.clone(),
        Some(r) => {
            let out = String::from_utf8_lossy(&r.output);
            let out: String = out.chars().take(60).collect();
            out.replace('\n', " ")
        }
    }
}

fn print_commands(cmds: &[v1::Command]) {
    println!(
        "{:<33} {:<20} {:<10} {:<10} {:<8} {:<10} RESULT",
        "ID", "AGENT", "KIND", "STATE", "ATTEMPTS", "CREATED"
    );
    for c in cmds {
        println!(
            "{:<33} {:<20} {:<10} {:<10} {:<8} {:<10} {}",
            c.id,
            c.agent,
            c.kind,
            state_of(c),
            c.attempts,
            ago(&c.created),
            result_text(c)
        );
    }
}

fn ts_json(t: &Option<prost_types::Timestamp>) -> serde_json::Value {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| serde_json::Value::String(humantime::format_rfc3339_millis(t).to_string()))
        .unwrap_or(serde_json::Value::Null)
}

fn json_command(c: &v1::Command) -> serde_json::Value {
    serde_json::json!({
        "id": c.id,
        "agent": c.agent,
        "kind": c.kind,
        "content_type": c.content_type,
        "idempotency_key": c.idempotency_key,
        "ordering_key": c.ordering_key,
        "state": state_of(c),
        "attempts": c.attempts,
        "created": ts_json(&c.created),
        "delivered": ts_json(&c.delivered),
        "started": ts_json(&c.started),
        "finished": ts_json(&c.finished),
        "expires": ts_json(&c.expires),
        "output": c.result.as_ref().map(|r| String::from_utf8_lossy(&r.output).into_owned()),
        "message": c.result.as_ref().map(|r| r.message.clone()),
        "progress": c.progress,
    })
}

async fn commands_cmd(channel: ctl::Conn, cmd: CommandsCmd, output: Output) -> Result<(), Exit> {
    let mut client = v1::commands_client::CommandsClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let show = |c: &v1::Command| match output {
        Output::Table => print_commands(std::slice::from_ref(c)),
        Output::Json => println!("{}", json_command(c)),
    };
    match cmd {
        CommandsCmd::Submit {
            agent,
            kind,
            payload,
            payload_file,
            content_type,
            idempotency_key,
            ttl,
            ordering_key,
            watch,
        } => {
            let payload = match payload_file {
                None => payload.into_bytes(),
                Some(p) if p.as_os_str() == "-" => {
                    use std::io::Read as _;
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .map_err(|e| format!("reading stdin: {e}"))?;
                    b
                }
                Some(p) => std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?,
            };
            let r = client
                .submit(v1::SubmitCommandRequest {
                    agent,
                    kind,
                    payload,
                    content_type,
                    idempotency_key,
                    ttl: ttl.and_then(|t| prost_types::Duration::try_from(t).ok()),
                    ordering_key,
                })
                .await
                .map_err(status)?
                .into_inner();
            match output {
                Output::Table => println!(
                    "{}{}",
                    r.id,
                    if r.created {
                        ""
                    } else {
                        " (existing command for this idempotency key)"
                    }
                ),
                Output::Json => {
                    println!("{}", serde_json::json!({"id": r.id, "created": r.created}))
                }
            }
            if watch {
                return watch_commands(
                    &mut client,
                    v1::watch_commands_request::Target::Id(r.id),
                    output,
                )
                .await;
            }
        }
        CommandsCmd::Get { id } => show(
            &client
                .get(v1::GetCommandRequest { id })
                .await
                .map_err(status)?
                .into_inner(),
        ),
        CommandsCmd::List {
            agent,
            state,
            kind,
            limit,
            page_token,
        } => {
            let state = match state {
                None => 0,
                Some(s) => v1::CommandState::from_str_name(&s.to_uppercase())
                    .ok_or_else(|| format!("unknown state {s:?}: queued, delivered, running, succeeded, failed, expired or cancelled"))?
                    as i32,
            };
            let r = client
                .list(v1::ListCommandsRequest {
                    agent: agent.unwrap_or_default(),
                    state,
                    kind: kind.unwrap_or_default(),
                    page_size: limit,
                    page_token,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            match output {
                Output::Table => {
                    print_commands(&r.commands);
                    if !r.next_page_token.is_empty() {
                        println!("more: --page-token {}", r.next_page_token);
                    }
                }
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "commands": r.commands.iter().map(json_command).collect::<Vec<_>>(),
                        "next_page_token": r.next_page_token,
                    })
                ),
            }
        }
        CommandsCmd::Watch { id, agent } => {
            let target = match (id, agent) {
                (Some(id), _) => v1::watch_commands_request::Target::Id(id),
                (None, Some(a)) => v1::watch_commands_request::Target::Agent(a),
                (None, None) => {
                    return Err("watch what? pass a command id or --agent <tenant>/<agent>".into());
                }
            };
            return watch_commands(&mut client, target, output).await;
        }
        CommandsCmd::Cancel { id } => show(
            &client
                .cancel(v1::CancelCommandRequest { id })
                .await
                .map_err(status)?
                .into_inner(),
        ),
    }
    Ok(())
}

/// Prints each transition and each new progress line as it happens.
async fn watch_commands(
    client: &mut v1::commands_client::CommandsClient<ctl::Conn>,
    target: v1::watch_commands_request::Target,
    output: Output,
) -> Result<(), Exit> {
    let one = matches!(target, v1::watch_commands_request::Target::Id(_));
    use std::io::Write as _;
    let mut stream = client
        .watch(v1::WatchCommandsRequest {
            target: Some(target),
        })
        .await
        .map_err(status)?
        .into_inner();
    // Per command: the last state printed and how many progress lines were shown.
    let mut shown: std::collections::HashMap<String, (i32, Vec<String>)> = Default::default();
    // Watching one command: its last state, to exit non-zero when it did not succeed.
    let mut last: Option<v1::Command> = None;
    while let Some(ev) = stream.message().await.map_err(status)? {
        let Some(c) = ev.command else { continue };
        if one {
            last = Some(c.clone());
        }
        if output == Output::Json {
            println!(
                "{}",
                serde_json::json!({"initial": ev.initial, "command": json_command(&c)})
            );
            let _ = std::io::stdout().flush();
            continue;
        }
        let (last_state, last_progress) = shown.entry(c.id.clone()).or_insert((0, Vec::new()));
        // Progress keeps the last lines: print those not seen yet.
        let new_from = (0..=last_progress.len())
            .find(|&k| c.progress.starts_with(&last_progress[k..]))
            .map_or(0, |k| last_progress.len() - k);
        for line in c.progress.iter().skip(new_from) {
            println!("{}  progress  {line}", c.id);
        }
        *last_progress = c.progress.clone();
        if *last_state != c.state {
            *last_state = c.state;
            let extra = match c.state() {
                v1::CommandState::Delivered => format!(" (attempt {})", c.attempts),
                v1::CommandState::AwaitingApproval => format!(
                    " (in the data plane: `tether-agent approve {}` or `reject {} --reason …` in the agent's pod)",
                    c.id, c.id
                ),
                v1::CommandState::Succeeded
                | v1::CommandState::Failed
                | v1::CommandState::Expired
                | v1::CommandState::Cancelled => {
                    let r = result_text(&c);
                    if r.is_empty() {
                        String::new()
                    } else {
                        format!(": {r}")
                    }
                }
                _ => String::new(),
            };
            println!(
                "{}  {:<10} {} {}{extra}",
                c.id,
                state_of(&c).to_uppercase(),
                c.agent,
                c.kind
            );
        }
        let _ = std::io::stdout().flush();
    }
    match last {
        Some(c)
            if matches!(
                c.state(),
                v1::CommandState::Failed | v1::CommandState::Expired | v1::CommandState::Cancelled
            ) =>
        {
            let r = result_text(&c);
            Err(Exit::Unsuccessful(format!(
                "command {} ended {}{}",
                c.id,
                state_of(&c).to_uppercase(),
                if r.is_empty() {
                    String::new()
                } else {
                    format!(": {r}")
                }
            )))
        }
        _ => Ok(()),
    }
}

/// Why `tetherctl` exits non-zero.
#[derive(Debug)]
enum Exit {
    /// It could not do what was asked (exit code 1).
    Error(String),
    /// A command it watched to its end did not succeed: FAILED, EXPIRED or CANCELLED (exit
    /// code [`EXIT_UNSUCCESSFUL`]).
    Unsuccessful(String),
}

/// The exit code of `commands submit --watch` and `commands watch <id>` when the command ends
/// FAILED, EXPIRED or CANCELLED (1 stays for tetherctl's own failures).
pub const EXIT_UNSUCCESSFUL: u8 = 3;

impl From<String> for Exit {
    fn from(s: String) -> Exit {
        Exit::Error(s)
    }
}

impl From<&str> for Exit {
    fn from(s: &str) -> Exit {
        Exit::Error(s.to_owned())
    }
}

fn target(cli: &Cli) -> Result<Target, String> {
    let dev = if cli.dev_json.exists() {
        Some(DevJson::read(&cli.dev_json)?)
    } else {
        None
    };
    let pick = |flag: &Option<PathBuf>, from_dev: Option<PathBuf>, what: &str| {
        flag.clone().or(from_dev).ok_or_else(|| {
            format!(
                "no {what}: pass --{what} (or run `tether-gateway dev`, which writes {DEV_JSON})"
            )
        })
    };
    let (cert, key) = match (&cli.token, &cli.cert, &cli.key) {
        // A token is enough; a certificate is sent only when one was given.
        (Some(_), None, None) => (PathBuf::new(), PathBuf::new()),
        _ => (
            pick(
                &cli.cert,
                dev.as_ref().map(|d| d.client_cert.clone()),
                "cert",
            )?,
            pick(&cli.key, dev.as_ref().map(|d| d.client_key.clone()), "key")?,
        ),
    };
    Ok(Target {
        addr: cli
            .northbound
            .clone()
            .or(dev.as_ref().map(|d| d.northbound.clone()))
            .ok_or_else(|| format!("no gateway address: pass --northbound host:port (or run `tether-gateway dev`, which writes {DEV_JSON})"))?,
        ca: pick(&cli.ca, dev.as_ref().map(|d| d.ca.clone()), "ca")?,
        cert,
        key,
        server_name: cli.server_name.clone(),
    })
}

fn ago(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return "-".into() };
    let Ok(st) = SystemTime::try_from(*t) else {
        return "-".into();
    };
    match SystemTime::now().duration_since(st) {
        Ok(d) => tether_runtime::duration::approx(d),
        Err(_) => "now".into(),
    }
}

fn rtt(s: &v1::Session) -> String {
    s.rtt
        .as_ref()
        .and_then(|d| Duration::try_from(*d).ok())
        .map(|d| format!("{:.1}ms", d.as_secs_f64() * 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// The agent's version, flagged when it is not the gateway's minor release (the version-skew
/// policy: `behind` is supported, `unsupported` is not).
fn version(s: &v1::Session) -> String {
    match v1::VersionSkew::try_from(s.version_skew) {
        Ok(v1::VersionSkew::Behind) => format!("{} (behind)", s.agent_version),
        Ok(v1::VersionSkew::Unsupported) => format!("{} (unsupported)", s.agent_version),
        _ => s.agent_version.clone(),
    }
}

fn print_agents(agents: &[v1::Agent]) {
    println!(
        "{:<28} {:<10} {:<8} {:<14} {:<22} {:<8} UP/SEEN",
        "AGENT", "CONNECTED", "SESSIONS", "VERSION", "REMOTE", "RTT"
    );
    for a in agents {
        let s = a.sessions.first();
        println!(
            "{:<28} {:<10} {:<8} {:<14} {:<22} {:<8} {}",
            a.id,
            match (a.connected, a.paused) {
                (true, true) => "paused",
                (true, false) => "yes",
                (false, _) => "no",
            },
            a.sessions.len(),
            s.map(version).unwrap_or_else(|| "-".into()),
            s.map(|s| s.remote_addr.as_str()).unwrap_or("-"),
            s.map(rtt).unwrap_or_else(|| "-".into()),
            match s {
                Some(s) => ago(&s.connected_at),
                None => format!("seen {} ago", ago(&a.last_seen)),
            }
        );
    }
}

fn json_agent(a: &v1::Agent) -> serde_json::Value {
    let mut j = serde_json::json!({
        "id": a.id,
        "connected": a.connected,
        "sessions": a.sessions.iter().map(json_session).collect::<Vec<_>>(),
        // By the gateway answering, since it started.
        "relayed_calls": a.relayed_calls,
        "relayed_bytes_to_agent": a.relayed_bytes_to_agent,
        "relayed_bytes_from_agent": a.relayed_bytes_from_agent,
    });
    // Only when the agent's owner paused it: the kill switch, enforced by the agent.
    if a.paused {
        j["paused"] = true.into();
    }
    j
}

fn json_session(s: &v1::Session) -> serde_json::Value {
    let mut j = serde_json::json!({
        "session_id": s.session_id,
        "agent": s.agent,
        "remote_addr": s.remote_addr,
        "transport": s.transport,
        "agent_version": s.agent_version,
        "version_skew": v1::VersionSkew::try_from(s.version_skew)
            .map(crate::tunnel::version::skew_name)
            .unwrap_or("unknown"),
        "instance_id": s.instance_id,
        "labels": s.labels,
        "rtt": rtt(s),
        "proxy": match v1::ProxyUse::try_from(s.proxy) {
            Ok(v1::ProxyUse::ProxyDirect) => "direct",
            Ok(v1::ProxyUse::ProxyHttp) => "http",
            _ => "unknown",
        },
        "services": s.services.iter()
            .map(|e| serde_json::json!({"name": e.name, "kind": e.kind}))
            .collect::<Vec<_>>(),
        "sessions_wanted": s.sessions_wanted,
    });
    if s.paused {
        j["paused"] = true.into();
        j["pause_reason"] = s.pause_reason.clone().into();
    }
    j
}

async fn run(cli: Cli) -> Result<(), Exit> {
    let target = target(&cli)?;
    let channel = ctl::connect_with_token(&target, cli.token.as_deref()).await?;
    if let Cmd::Console { no_browser } = &cli.cmd {
        return Ok(console(channel, &target.addr, *no_browser, cli.output).await?);
    }
    if let Cmd::Forward {
        agent,
        service,
        local_port,
        bind,
    } = &cli.cmd
    {
        return forward(
            channel,
            agent,
            service,
            std::net::SocketAddr::new(*bind, *local_port),
        )
        .await
        .map_err(Exit::from);
    }
    if let Cmd::Call {
        agent,
        method,
        data,
        service,
        timeout,
    } = &cli.cmd
    {
        agent
            .parse::<tunnel_proto::AgentId>()
            .map_err(|e| format!("agent {agent:?}: {e}"))?;
        let route = ctl::call::Route {
            agent: agent.clone(),
            service: service.clone(),
        };
        return Ok(ctl::call::call(
            channel,
            &route,
            method,
            data,
            *timeout,
            cli.output == Output::Table,
        )
        .await?);
    }
    let cli = match cli.cmd {
        Cmd::Commands(cmd) => return commands_cmd(channel, cmd, cli.output).await,
        Cmd::Tokens(cmd) => return Ok(tokens_cmd(channel, cmd, cli.output).await?),
        Cmd::Callers(cmd) => return Ok(callers_cmd(channel, cmd, cli.output).await?),
        _ => cli,
    };
    let mut client = AgentsClient::new(channel);
    match cli.cmd {
        Cmd::Agents(AgentsCmd::List { tenant, connected }) => {
            let r = client
                .list(v1::ListAgentsRequest {
                    tenant: tenant.unwrap_or_default(),
                    connected_only: connected,
                })
                .await
                .map_err(status)?
                .into_inner();
            match cli.output {
                Output::Table => print_agents(&r.agents),
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(r.agents.iter().map(json_agent).collect())
                ),
            }
        }
        Cmd::Agents(AgentsCmd::Get { agent }) => {
            let a = client
                .get(v1::GetAgentRequest { agent })
                .await
                .map_err(status)?
                .into_inner();
            match cli.output {
                Output::Table => print_agents(std::slice::from_ref(&a)),
                Output::Json => println!("{}", json_agent(&a)),
            }
        }
        Cmd::Agents(AgentsCmd::Revoke { agent, reason }) => {
            let r = client
                .revoke(v1::RevokeAgentRequest { agent, reason })
                .await
                .map_err(status)?
                .into_inner();
            match cli.output {
                Output::Table => {
                    println!(
                        "revoked {} as of {}: {} session(s) closed, {} pending enrollment token(s) invalidated",
                        r.agent,
                        match ts_json(&r.revoked_at) {
                            serde_json::Value::String(s) => s,
                            _ => "-".into(),
                        },
                        r.sessions_closed,
                        r.tokens_invalidated
                    );
                    for c in &r.certificates {
                        println!(
                            "  certificate sha256:{} serial:{}",
                            c.sha256_fingerprint, c.serial
                        );
                    }
                }
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "agent": r.agent,
                        "revoked_at": ts_json(&r.revoked_at),
                        "sessions_closed": r.sessions_closed,
                        "tokens_invalidated": r.tokens_invalidated,
                        "certificates": r.certificates.iter().map(|c| serde_json::json!({
                            "sha256_fingerprint": c.sha256_fingerprint, "serial": c.serial,
                        })).collect::<Vec<_>>(),
                    })
                ),
            }
        }
        Cmd::Forward { .. }
        | Cmd::Console { .. }
        | Cmd::Call { .. }
        | Cmd::Commands(_)
        | Cmd::Tokens(_)
        | Cmd::Callers(_) => {
            unreachable!("handled above")
        }
        Cmd::Agents(AgentsCmd::Watch { tenant, agent }) => {
            let mut stream = client
                .watch(v1::WatchAgentsRequest {
                    tenant: tenant.unwrap_or_default(),
                    agent: agent.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            while let Some(ev) = stream.message().await.map_err(status)? {
                let kind = match v1::agent_event::Kind::try_from(ev.kind) {
                    Ok(v1::agent_event::Kind::Connected) => "CONNECTED",
                    Ok(v1::agent_event::Kind::Disconnected) => "DISCONNECTED",
                    _ => "UNKNOWN",
                };
                let session = ev.session.as_ref();
                match cli.output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({
                            "kind": kind, "agent": ev.agent, "initial": ev.initial, "reason": ev.reason,
                            "session": session.map(json_session),
                        })
                    ),
                    Output::Table => println!(
                        "{:<12} {:<28} session={} remote={}{}{}",
                        kind,
                        ev.agent,
                        session.map(|s| s.session_id.as_str()).unwrap_or("-"),
                        session.map(|s| s.remote_addr.as_str()).unwrap_or("-"),
                        if ev.initial {
                            " (already connected)"
                        } else {
                            ""
                        },
                        if ev.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" reason={}", ev.reason)
                        },
                    ),
                }
            }
        }
    }
    Ok(())
}

async fn forward(
    channel: ctl::Conn,
    agent: &str,
    service: &str,
    listen: std::net::SocketAddr,
) -> Result<(), String> {
    agent
        .parse::<tunnel_proto::AgentId>()
        .map_err(|e| format!("agent {agent:?}: {e}"))?;
    check_forwardable(&channel, agent, service).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listening on {listen}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("forwarding {local} -> {agent} service {service}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Out of file descriptors, it waits for one to be freed instead of exiting or spinning.
    let mut listener = tether_runtime::accept::Acceptor::new(listener, "forward");
    loop {
        let (tcp, peer) = listener.accept().await;
        let (channel, agent, service) = (channel.clone(), agent.to_owned(), service.to_owned());
        tokio::spawn(async move {
            if let Err(e) = carry(channel, &agent, &service, tcp).await {
                eprintln!("tetherctl forward: connection from {peer}: {e}");
            }
        });
    }
}

/// Asks the agent (its built-in `AgentInfo`, through the tunnel) whether `service` is in its
/// allow-list and speaks TCP, so that a mistake shows now and not as an empty reply to the
/// first connection. An agent that cannot be asked now (offline) gets a warning: the
/// forward is set up anyway and each connection says what happens.
async fn check_forwardable(channel: &ctl::Conn, agent: &str, service: &str) -> Result<(), String> {
    use tether_api::agent::v1::GetAgentInfoRequest;
    use tether_api::agent::v1::agent_info_client::AgentInfoClient;
    let mut req = tonic::Request::new(GetAgentInfoRequest {});
    req.metadata_mut().insert(
        "tether-agent",
        agent.parse().map_err(|_| "agent id is not ASCII")?,
    );
    req.metadata_mut().insert(
        "tether-service",
        tonic::metadata::MetadataValue::from_static("agent"),
    );
    req.set_timeout(Duration::from_secs(10));
    let info = match AgentInfoClient::new(channel.clone()).get(req).await {
        Ok(r) => r.into_inner(),
        Err(s)
            if s.code() == tonic::Code::Unavailable
                || s.code() == tonic::Code::DeadlineExceeded =>
        {
            eprintln!(
                "tetherctl forward: cannot check service {service:?} on agent {agent} now ({}); forwarding anyway",
                status(s)
            );
            return Ok(());
        }
        Err(s) => return Err(format!("agent {agent}: {}", status(s))),
    };
    let listing = || {
        let mut names: Vec<String> = info
            .services
            .iter()
            .filter(|n| n.as_str() != "agent")
            .map(|n| match info.service_kinds.get(n) {
                Some(k) => format!("{n} ({k})"),
                None => n.clone(),
            })
            .collect();
        names.sort();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    if !info.services.iter().any(|n| n == service) {
        return Err(format!(
            "agent {agent} has no service {service:?} in its allow-list (its services: {}); add [services.{service}] with kind = \"tcp\" to the agent's config",
            listing()
        ));
    }
    match info.service_kinds.get(service).map(String::as_str) {
        Some("tcp") | None => Ok(()),
        Some(kind) => Err(format!(
            "service {service:?} on agent {agent} is {kind}, and forward carries raw TCP only (kind = \"tcp\"); call a gRPC service through the gateway instead (`tetherctl call`, or grpcurl with -H 'tether-agent: {agent}' -H 'tether-service: {service}')"
        )),
    }
}

/// The most `forward` reads from a local connection at once: one message.
const READ_CHUNK: usize = 64 * 1024;
/// The most bytes of messages already received that `forward` gathers into one write.
const WRITE_GATHER: usize = 256 * 1024;

/// One local connection as one `Streams/Open` call; half-close travels both ways.
async fn carry(
    channel: ctl::Conn,
    agent: &str,
    service: &str,
    tcp: tokio::net::TcpStream,
) -> Result<(), String> {
    use futures::FutureExt as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::StreamChunk>(4);
    tokio::spawn(async move {
        // Read straight into the buffer the message carries: no copy on the way to the encoder.
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return, // dropping tx ends the request stream: half-close
                Ok(_) => {
                    let data = buf.split().freeze();
                    if tx.send(v1::StreamChunk { data }).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "tether-agent",
        agent.parse().map_err(|_| "agent id is not ASCII")?,
    );
    req.metadata_mut().insert(
        "tether-service",
        service.parse().map_err(|_| "service is not ASCII")?,
    );
    let mut client = tether_api::v1::streams_client::StreamsClient::new(channel);
    let mut inbound = client.open(req).await.map_err(status)?.into_inner();
    // Messages that have already arrived leave in one gathered write (the gateway sends what
    // the tunnel delivered, often a packet's worth per message).
    let mut gathered = tether_runtime::stream::Gathered::default();
    let mut ended = None;
    while let Some(chunk) = inbound.message().await.map_err(status)? {
        gathered.push(chunk.data);
        while gathered.has_room(WRITE_GATHER) {
            match inbound.message().now_or_never() {
                Some(Ok(Some(chunk))) => gathered.push(chunk.data),
                Some(Ok(None)) => {
                    ended = Some(Ok(()));
                    break;
                }
                Some(Err(s)) => {
                    ended = Some(Err(status(s)));
                    break;
                }
                None => break,
            }
        }
        wr.write_all_buf(&mut gathered)
            .await
            .map_err(|e| format!("writing to the local connection: {e}"))?;
        if let Some(end) = ended {
            end?;
            break;
        }
    }
    wr.shutdown()
        .await
        .map_err(|e| format!("closing the local connection: {e}"))
}

/// Runs `tetherctl` with the process's arguments.
pub fn main() -> ExitCode {
    tether_runtime::tls::install_crypto_provider();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit::Error(e)) => {
            eprintln!("tetherctl: {e}");
            ExitCode::FAILURE
        }
        Err(Exit::Unsuccessful(e)) => {
            eprintln!("tetherctl: {e}");
            ExitCode::from(EXIT_UNSUCCESSFUL)
        }
    }
}
