-- Each replica's count of agent sessions, written by the replica itself about once a second
-- when it changed: how replicas see their share of the fleet's sessions (storm control and
-- rebalancing) without counting `agent_sessions`.
ALTER TABLE gateway_replicas ADD COLUMN sessions bigint NOT NULL DEFAULT 0;
