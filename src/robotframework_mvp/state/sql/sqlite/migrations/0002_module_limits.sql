-- Modules record their retry budget so a process that does not run a module (an API-only
-- process) still gives its robots the module's max_attempts.
ALTER TABLE modules ADD COLUMN max_attempts INTEGER;
