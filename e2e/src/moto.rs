//! A real AWS Secrets Manager and ECR for tests: moto's server (`moto[server]`, pinned in
//! `requirements-test.txt`) in a child Python process on a free loopback port, and
//! [`FaultProxy`], which puts in front of it the throttling and quota errors that moto never
//! produces, and records which operations reach it.
//!
//! Python comes from `$TETHER_TEST_PYTHON`, else the workspace's `.venv` (both set up by
//! `scripts/test`), as for the other Python peers.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
use tether_agent::config::AwsConfig;
use tether_agent::ecr::Ecr;
use tether_agent::secrets::SecretsManager;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The region every moto test uses.
pub const REGION: &str = "us-east-1";

/// How long moto may take to start (importing moto is slow on a loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Starts `ThreadedMotoServer` on port 0 and prints `{"port": N}` (and, with `--iam USERS`, the
/// access keys of those IAM users) as one JSON line; exits when its stdin closes, so it never
/// outlives the test. With `--iam`, USERS is a JSON object `{"<user>": ["<action>", ...]}`: each
/// user is created with a policy allowing those actions on every resource, then
/// `INITIAL_NO_AUTH_ACTION_COUNT` is set to 0 so that from then on every request is
/// authenticated and checked against its user's policies (moto's IAM enforcement; moto checks
/// the action, and for ECR and Secrets Manager not the resource).
const SERVER_PY: &str = r#"
import json, logging, sys
try:
    from moto import settings
    from moto.server import ThreadedMotoServer
except ImportError as e:
    print(json.dumps({"missing": str(e)}), flush=True)
    sys.exit(3)
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
out = {"port": port}
if "--iam" in sys.argv:
    import boto3
    iam = boto3.client("iam", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                       aws_access_key_id="test", aws_secret_access_key="test")
    spec = json.loads(sys.argv[sys.argv.index("--iam") + 1])
    def user(name, actions):
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}
    out["users"] = {name: user(name, actions) for name, actions in spec.items()}
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
print(json.dumps(out), flush=True)
sys.stdin.read()
server.stop()
"#;

/// The Python the tests run: `$TETHER_TEST_PYTHON`, else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_TEST_PYTHON") {
        return p.into();
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        venv.exists(),
        "no Python for the moto Secrets Manager emulator: {} does not exist and TETHER_TEST_PYTHON \
         is not set; run the suite with scripts/test, which creates .venv and installs \
         requirements-test.txt (moto[server]) into it",
        venv.display()
    );
    venv
}

/// The user every IAM-enforcing server has: it may do anything in Secrets Manager and ECR (the
/// test's own clients, [`Moto::client`] and [`Moto::ecr_client`], use it).
pub const ADMIN: (&str, &[&str]) = ("admin", &["secretsmanager:*", "ecr:*"]);

/// The users of [`Moto::start_with_iam`].
const SECRETS_USERS: &[(&str, &[&str])] = &[
    ("reader", &["secretsmanager:GetSecretValue"]),
    (
        "denied",
        &[
            "secretsmanager:DescribeSecret",
            "secretsmanager:ListSecrets",
        ],
    ),
];

/// Access keys of the IAM users of a [`Moto::start_with_iam`] server.
#[derive(Clone, Debug)]
pub struct IamUsers {
    /// May do anything in Secrets Manager (creates the test's secrets).
    pub admin: Credentials,
    /// May only `secretsmanager:GetSecretValue`.
    pub reader: Credentials,
    /// May `DescribeSecret` and `ListSecrets`, not `GetSecretValue`.
    pub denied: Credentials,
}

/// A moto server, killed on drop.
pub struct Moto {
    addr: SocketAddr,
    client: aws_sdk_secretsmanager::Client,
    ecr_client: aws_sdk_ecr::Client,
    users: BTreeMap<String, Credentials>,
    _stdin: tokio::process::ChildStdin,
    _child: tokio::process::Child,
}

impl Moto {
    /// Starts moto with no authentication: any credentials work.
    pub async fn start() -> Moto {
        Self::spawn(None).await
    }

    /// Starts moto enforcing IAM: only the [`IamUsers`] it creates are let in, each limited by
    /// its policy.
    pub async fn start_with_iam() -> Moto {
        Self::start_with_iam_users(SECRETS_USERS).await
    }

    /// Starts moto enforcing IAM with [`ADMIN`] and `users` (name, allowed actions; see
    /// [`user`](Self::user)).
    pub async fn start_with_iam_users(users: &[(&str, &[&str])]) -> Moto {
        let spec: BTreeMap<&str, &[&str]> = std::iter::once(ADMIN)
            .chain(users.iter().copied())
            .collect();
        Self::spawn(Some(serde_json::to_string(&spec).expect("users as JSON"))).await
    }

    async fn spawn(iam: Option<String>) -> Moto {
        crate::init();
        let python = python();
        let mut cmd = tokio::process::Command::new(&python);
        cmd.arg("-c").arg(SERVER_PY);
        if let Some(users) = &iam {
            cmd.arg("--iam").arg(users);
        }
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} for the moto Secrets Manager emulator: {e}; run the suite with \
                     scripts/test, which creates .venv with requirements-test.txt (or set \
                     TETHER_TEST_PYTHON)",
                    python.display()
                )
            });
        let stdin = child.stdin.take().expect("stdin");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("moto did not report its port within {START_TIMEOUT:?}"))
            .expect("read moto's stdout");
        let Some(line) = line else {
            let status = child.wait().await.expect("moto exit status");
            panic!("moto exited before reporting its port ({status}); see its stderr above");
        };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("moto printed {line:?}, not JSON: {e}"));
        if let Some(missing) = v["missing"].as_str() {
            panic!(
                "moto is not installed for {} ({missing}): run the suite with scripts/test, which \
                 installs requirements-test.txt (moto[server]==5.2.5) into .venv",
                python.display()
            );
        }
        let port = v["port"].as_u64().expect("port in moto's report") as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let users: BTreeMap<String, Credentials> = v["users"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(who, u)| {
                let creds = Credentials::new(
                    u["access_key_id"].as_str().expect("access key id"),
                    u["secret_access_key"].as_str().expect("secret access key"),
                    None,
                    None,
                    "moto-iam",
                );
                (who.clone(), creds)
            })
            .collect();
        let admin = users.get(ADMIN.0).cloned().unwrap_or_else(test_credentials);
        let endpoint = format!("http://{addr}");
        let client = sdk_client(&endpoint, admin.clone());
        let ecr_client = ecr_sdk_client(&endpoint, admin);
        let moto = Moto {
            addr,
            client,
            ecr_client,
            users,
            _stdin: stdin,
            _child: child,
        };
        moto.wait_ready().await;
        moto
    }

    /// Polls until moto answers a Secrets Manager call.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.client.list_secrets().send().await {
                Ok(_) => return,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "moto at {} did not answer within {START_TIMEOUT:?}: {}",
                    self.addr,
                    aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's address (for a [`FaultProxy`] in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An SDK client for the test to create, rotate and delete secrets (the admin user's keys
    /// under IAM enforcement, `test`/`test` otherwise).
    pub fn client(&self) -> &aws_sdk_secretsmanager::Client {
        &self.client
    }

    /// An ECR SDK client for the test to set up and read back repositories (the admin user's
    /// keys under IAM enforcement, `test`/`test` otherwise).
    pub fn ecr_client(&self) -> &aws_sdk_ecr::Client {
        &self.ecr_client
    }

    /// The IAM users, for a server started with [`start_with_iam`](Self::start_with_iam).
    pub fn users(&self) -> IamUsers {
        IamUsers {
            admin: self.user(ADMIN.0),
            reader: self.user("reader"),
            denied: self.user("denied"),
        }
    }

    /// The access keys of IAM user `name` of a server started with IAM enforcement.
    pub fn user(&self, name: &str) -> Credentials {
        self.users
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("moto has no IAM user {name:?} (started without IAM?)"))
    }

    /// The agent's `[aws]` for this server (3 attempts).
    pub fn aws_config(&self) -> AwsConfig {
        aws_config_for(&self.endpoint())
    }

    /// Creates a secret holding `value` (a `SecretString`); returns its version id.
    pub async fn create_secret(&self, name: &str, value: &str) -> String {
        self.client
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .expect("create secret")
            .version_id()
            .expect("version id")
            .to_owned()
    }
}

/// `[aws]` for an emulator at `endpoint`: region [`REGION`], 3 attempts.
pub fn aws_config_for(endpoint: &str) -> AwsConfig {
    AwsConfig {
        region: Some(REGION.into()),
        endpoint_url: Some(endpoint.to_owned()),
        max_attempts: 3,
    }
}

/// Static credentials `test`/`test` (moto without IAM takes any).
pub fn test_credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "moto")
}

/// The agent's [`SecretsManager`] for `cfg` with static `test`/`test` credentials (the
/// standard chain would look for real ones).
pub async fn secrets_manager(cfg: &AwsConfig) -> SecretsManager {
    SecretsManager::with_credentials(cfg, test_credentials()).await
}

/// The agent's [`Ecr`] for `cfg` with static `test`/`test` credentials.
pub async fn ecr(cfg: &AwsConfig) -> Ecr {
    Ecr::with_credentials(cfg, test_credentials()).await
}

fn ecr_sdk_client(endpoint: &str, credentials: Credentials) -> aws_sdk_ecr::Client {
    aws_sdk_ecr::Client::from_conf(
        aws_sdk_ecr::Config::builder()
            .behavior_version(aws_sdk_ecr::config::BehaviorVersion::latest())
            .region(aws_sdk_ecr::config::Region::new(REGION))
            .endpoint_url(endpoint)
            .credentials_provider(credentials)
            .build(),
    )
}

fn sdk_client(endpoint: &str, credentials: Credentials) -> aws_sdk_secretsmanager::Client {
    aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .endpoint_url(endpoint)
            .credentials_provider(credentials)
            .build(),
    )
}

// === FaultProxy ===

/// What [`FaultProxy`] answers instead of forwarding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `ThrottlingException` ("Rate exceeded"), as Secrets Manager answers a caller over its
    /// request rate: the SDK retries it with backoff.
    Throttling,
    /// `AccessDeniedException`, as Secrets Manager answers when no policy allows the call. moto
    /// under IAM enforcement denies too ([`Moto::start_with_iam`]) but answers in its IAM
    /// (query/XML) format with HTTP 403 and no JSON error type, so the error-code path needs
    /// this.
    AccessDenied,
    /// `LimitExceededException`, as ECR answers a `CreateRepository` over the account's
    /// repository quota (moto has no quotas).
    LimitExceeded,
}

impl Fault {
    fn error_type(self) -> &'static str {
        match self {
            Fault::Throttling => "ThrottlingException",
            Fault::AccessDenied => "AccessDeniedException",
            Fault::LimitExceeded => "LimitExceededException",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Fault::Throttling => "Rate exceeded",
            Fault::AccessDenied => {
                "User: arn:aws:sts::123456789012:assumed-role/tether-agent/test is not authorized \
                 to perform: secretsmanager:GetSecretValue because no identity-based policy \
                 allows the secretsmanager:GetSecretValue action"
            }
            Fault::LimitExceeded => {
                "The operation did not succeed because it would have exceeded a service limit \
                 for your account (repositories per region)"
            }
        }
    }
}

/// An HTTP/1.1 proxy in front of moto that answers the first `n` requests (or all; or only
/// those of one operation) with a [`Fault`] in the real wire format of Secrets Manager and ECR
/// (AWS JSON 1.1: HTTP 400, `x-amzn-ErrorType` and `{"__type": ..., "message": ...}`) and
/// forwards the rest, counting every request and recording its operation (`X-Amz-Target`).
///
/// A fake in the sense of STYLE.md: moto itself never throttles and has no quotas, and no real
/// component on this machine does, so those answers are made here; everything else is moto's.
/// One request per connection (every answer says `Connection: close`); chunked request bodies
/// are not supported (the SDK sends a `Content-Length`).
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

/// Which requests get a fault.
#[derive(Clone, Debug)]
struct Rule {
    fault: Option<Fault>,
    /// How many of the matching requests (`None`: all).
    first: Option<usize>,
    /// Only requests of this operation match (`None`: every request).
    operation: Option<String>,
}

#[derive(Debug, Default)]
struct ProxyState {
    requests: AtomicUsize,
    matched: AtomicUsize,
    operations: Mutex<Vec<String>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free loopback port; `first`: how many requests get
    /// the fault (`None`: all).
    pub async fn start(upstream: SocketAddr, fault: Fault, first: Option<usize>) -> FaultProxy {
        Self::spawn(
            upstream,
            Rule {
                fault: Some(fault),
                first,
                operation: None,
            },
        )
        .await
    }

    /// A proxy that answers every request of `operation` (e.g. `CreateRepository`) with
    /// `fault` and forwards the others.
    pub async fn start_for(upstream: SocketAddr, fault: Fault, operation: &str) -> FaultProxy {
        Self::spawn(
            upstream,
            Rule {
                fault: Some(fault),
                first: None,
                operation: Some(operation.to_owned()),
            },
        )
        .await
    }

    /// A proxy that forwards everything, recording each request's operation.
    pub async fn recording(upstream: SocketAddr) -> FaultProxy {
        Self::spawn(
            upstream,
            Rule {
                fault: None,
                first: None,
                operation: None,
            },
        )
        .await
    }

    async fn spawn(upstream: SocketAddr, rule: Rule) -> FaultProxy {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let addr = l.local_addr().expect("addr");
        let state = Arc::new(ProxyState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = l.accept().await {
                let (state, rule) = (shared.clone(), rule.clone());
                tokio::spawn(async move {
                    if let Err(e) = proxy_one(conn, upstream, &rule, &state).await {
                        tracing::warn!("fault proxy: {e}");
                    }
                });
            }
        });
        FaultProxy { addr, state, task }
    }

    /// A proxy to `upstream` that forwards every request and counts them: how a test shows
    /// that nothing reached Secrets Manager.
    pub async fn counting(upstream: SocketAddr) -> FaultProxy {
        Self::start(upstream, Fault::Throttling, Some(0)).await
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far (faulted and forwarded).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The operation of each request received so far, in order (the part of `X-Amz-Target`
    /// after the dot, e.g. `CreateRepository`; empty when a request had none).
    pub fn operations(&self) -> Vec<String> {
        self.state.operations.lock().expect("lock").clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_one(
    mut conn: tokio::net::TcpStream,
    upstream: SocketAddr,
    rule: &Rule,
    state: &ProxyState,
) -> std::io::Result<()> {
    let Some((head, body)) = read_message(&mut conn, true).await? else {
        return Ok(());
    };
    let operation = String::from_utf8_lossy(&head)
        .split("\r\n")
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case("x-amz-target").then(|| {
                value
                    .trim()
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
        })
        .unwrap_or_default();
    state
        .operations
        .lock()
        .expect("lock")
        .push(operation.clone());
    let n = state.requests.fetch_add(1, Ordering::SeqCst);
    let fault = rule.fault.filter(|_| {
        rule.operation.as_ref().is_none_or(|o| *o == operation)
            && rule
                .first
                .is_none_or(|first| state.matched.fetch_add(1, Ordering::SeqCst) < first)
    });
    if let Some(fault) = fault {
        let body = serde_json::json!({"__type": fault.error_type(), "message": fault.message()})
            .to_string();
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\n\
             x-amzn-ErrorType: {}\r\nx-amzn-RequestId: fault-proxy-{n}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            fault.error_type(),
            body.len()
        );
        conn.write_all(answer.as_bytes()).await?;
    } else {
        let mut up = tokio::net::TcpStream::connect(upstream).await?;
        up.write_all(&with_connection_close(&head)).await?;
        up.write_all(&body).await?;
        // moto closes after answering a `Connection: close` request.
        let (head, body) = read_message(&mut up, false)
            .await?
            .ok_or_else(|| std::io::Error::other("moto closed without answering"))?;
        conn.write_all(&with_connection_close(&head)).await?;
        conn.write_all(&body).await?;
    }
    conn.shutdown().await
}

/// Reads one HTTP/1.1 message: its head (through the blank line) and its body, sized by
/// `Content-Length` (a request without one has none; a response without one ends at EOF).
async fn read_message(
    s: &mut tokio::net::TcpStream,
    request: bool,
) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::other("connection closed inside a head"))
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut body = buf.split_off(end);
    let head = buf;
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if text.contains("\r\ntransfer-encoding: chunked") {
        return Err(std::io::Error::other("chunked bodies are not supported"));
    }
    let length = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other("connection closed inside a body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None if request => body.clear(),
        None => {
            s.read_to_end(&mut body).await?;
        }
    }
    Ok(Some((head, body)))
}

/// `head` with its `Connection` header replaced by `Connection: close`.
fn with_connection_close(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !line.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}
