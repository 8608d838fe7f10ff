-- Steps that require capabilities run on remote nodes, and wait for one.
ALTER TABLE action_steps ADD COLUMN waiting_for TEXT NULL;         -- while status = 'waiting': the requirement no node meets
ALTER TABLE action_steps ADD COLUMN node VARCHAR(64) NULL;         -- the node its latest attempt ran on; NULL: the app server
ALTER TABLE action_step_attempts ADD COLUMN node VARCHAR(64) NULL; -- the node the attempt ran on; NULL: the app server
