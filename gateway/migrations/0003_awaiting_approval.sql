-- A command may wait in its agent for the data plane owner's approval: state 8,
-- `tether.v1.CommandState.AWAITING_APPROVAL`, is unfinished like QUEUED, DELIVERED and RUNNING,
-- so the index of unfinished commands (what a replica taking an agent's lease reads) covers it.
DROP INDEX commands_unfinished;
CREATE INDEX commands_unfinished ON commands (agent, seq) WHERE state IN (1, 2, 3, 8);
