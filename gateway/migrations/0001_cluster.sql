-- The cluster's shared state: replicas, presence, the event feed and command leases.
-- Nothing here is written per heartbeat or per lease renewal (docs: ARCHITECTURE.md, "Replicas").

-- One row per replica name. `epoch` grows each time a process takes the name, so rows a dead
-- process left (sessions, leases) never count for the next one. Alive while `expires_at` is
-- ahead of the database's clock: the only clock the cluster compares.
CREATE TABLE gateway_replicas (
    replica_id   text PRIMARY KEY,
    epoch        bigint NOT NULL,
    advertise    text NOT NULL,
    version      text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    draining     boolean NOT NULL DEFAULT false
);

-- Agents ever seen, for "known but offline" and last seen.
CREATE TABLE agents (
    agent      text PRIMARY KEY,
    tenant     text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX agents_by_tenant ON agents (tenant, agent);

-- Live sessions, one row each, written on connect and removed on disconnect (in batches).
-- A row counts only while its replica (replica_id, replica_epoch) is alive.
CREATE TABLE agent_sessions (
    session_id    text PRIMARY KEY,
    replica_id    text NOT NULL,
    replica_epoch bigint NOT NULL,
    agent         text NOT NULL,
    tenant        text NOT NULL,
    connected_at  timestamptz NOT NULL,
    info          bytea NOT NULL -- tether.v1.Session, protobuf
);
CREATE INDEX agent_sessions_by_agent ON agent_sessions (agent);
CREATE INDEX agent_sessions_by_tenant ON agent_sessions (tenant, agent);
CREATE INDEX agent_sessions_by_replica ON agent_sessions (replica_id, replica_epoch);

-- Everything another replica must learn about: command transitions, sessions up and down,
-- revocations. Readers take rows in (xid, seq) order, and only rows whose transaction is older
-- than every transaction still running (`pg_snapshot_xmin`), so a row committed late is never
-- skipped. Pruned by age.
CREATE TABLE cluster_events (
    xid   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq   bigint GENERATED ALWAYS AS IDENTITY,
    at    timestamptz NOT NULL DEFAULT now(),
    kind  smallint NOT NULL,
    agent text NOT NULL DEFAULT '',
    body  bytea NOT NULL DEFAULT '\x',
    PRIMARY KEY (xid, seq)
);
CREATE INDEX cluster_events_by_age ON cluster_events (at);

-- One row per agent with commands: its submission counter and who delivers its commands.
-- The lease is (lease_replica, lease_replica_epoch), valid exactly while that replica is alive;
-- `lease_epoch` grows at every take-over and fences the previous holder's writes.
CREATE TABLE agent_queues (
    agent               text PRIMARY KEY,
    tenant              text NOT NULL,
    next_seq            bigint NOT NULL DEFAULT 0,
    lease_replica       text,
    lease_replica_epoch bigint,
    lease_epoch         bigint NOT NULL DEFAULT 0
);
CREATE INDEX agent_queues_by_lease ON agent_queues (lease_replica, lease_replica_epoch);

-- Identity: the same records as the embedded identity store (JSON), one row each.
CREATE TABLE revoked_agents (
    agent  text PRIMARY KEY,
    record jsonb NOT NULL -- AgentRevocation
);
CREATE TABLE revoked_certs (
    fingerprint text PRIMARY KEY,
    agent       text NOT NULL
);
CREATE TABLE enrollment_tokens (
    hash       text PRIMARY KEY, -- SHA-256 of the token; the token itself is never stored
    agent      text NOT NULL,
    expires_ms bigint NOT NULL,
    record     jsonb NOT NULL -- TokenRecord
);
CREATE INDEX enrollment_tokens_by_agent ON enrollment_tokens (agent);
CREATE INDEX enrollment_tokens_by_expiry ON enrollment_tokens (expires_ms);
CREATE TABLE revoked_callers (
    name   text PRIMARY KEY,
    record jsonb NOT NULL -- CallerRevocation
);
CREATE TABLE revoked_caller_certs (
    fingerprint text PRIMARY KEY,
    record      jsonb NOT NULL -- RevokedCallerCert
);
-- When each agent was last issued a certificate by renewal (one a second, cluster-wide).
CREATE TABLE renewals (
    agent          text PRIMARY KEY,
    last_issued_ms bigint NOT NULL
);

-- Commands. `record` is the tether.v1.Command without its payload (in command_payloads,
-- written once) and without an output above 64 KiB (in `output`, read by Get only). The
-- indexed columns are what List, delivery and retention look up by.
CREATE TABLE commands (
    id              text PRIMARY KEY,
    agent           text NOT NULL,
    tenant          text NOT NULL,
    seq             bigint NOT NULL, -- submission order (a sequence: causal order kept)
    state           smallint NOT NULL,
    kind            text NOT NULL,
    idempotency_key text NOT NULL,
    created_ms      bigint NOT NULL,
    expires_ms      bigint,
    finished_ms     bigint,
    version         bigint NOT NULL,
    record          bytea NOT NULL,
    output          bytea
);
CREATE SEQUENCE commands_seq AS bigint;
CREATE UNIQUE INDEX commands_by_idempotency ON commands (agent, idempotency_key)
    WHERE idempotency_key <> '';
CREATE INDEX commands_by_agent ON commands (agent, id);
CREATE INDEX commands_by_tenant ON commands (tenant, id);
-- QUEUED, DELIVERED, RUNNING: the work of an agent, in submission order.
CREATE INDEX commands_unfinished ON commands (agent, seq) WHERE state IN (1, 2, 3);
CREATE INDEX commands_expiring ON commands (expires_ms) WHERE state = 1 AND expires_ms IS NOT NULL;
CREATE INDEX commands_finished ON commands (finished_ms, id) WHERE finished_ms IS NOT NULL;
CREATE TABLE command_payloads (
    id      text PRIMARY KEY REFERENCES commands (id) ON DELETE CASCADE,
    payload bytea NOT NULL
);
-- Unfinished commands per agent = submitted - finished: Submits count on agent_queues (and
-- lock it, so the limit holds across replicas), the lease holder counts on its own row.
ALTER TABLE agent_queues ADD COLUMN submitted bigint NOT NULL DEFAULT 0;
CREATE TABLE agent_finished (
    agent    text PRIMARY KEY,
    finished bigint NOT NULL DEFAULT 0
);
