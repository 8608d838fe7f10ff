-- Steps that require capabilities wait for a node that has them.
ALTER TABLE action_steps ADD COLUMN waiting_for TEXT;  -- while status = 'waiting': the requirement no node meets
