-- Steps that require capabilities run on remote nodes, and wait for one.
ALTER TABLE action_steps ADD COLUMN waiting_for TEXT;  -- while status = 'waiting': the requirement no node meets
ALTER TABLE action_steps ADD COLUMN node TEXT;         -- the node its latest attempt ran on; NULL: the app server
ALTER TABLE action_step_attempts ADD COLUMN node TEXT; -- the node the attempt ran on; NULL: the app server
