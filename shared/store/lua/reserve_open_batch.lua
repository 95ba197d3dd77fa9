-- Counts a batch among its tenant's open batches while fewer than the limit are open.
-- KEYS[1]: the tenant's open batches. ARGV: batch id, limit, now (unix ms).
-- Returns 1 when counted (or already), 0 at the limit.

if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
