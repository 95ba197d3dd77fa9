-- Gives a lease back if still held with the caller's token.
-- KEYS[1]: the lease key. ARGV[1]: the token.
-- Returns 1 when released, 0 otherwise.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
