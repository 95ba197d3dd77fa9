-- Sets the caller's token unless the key is held.
-- KEYS[1]: the idempotency key. ARGV: the caller's token, the claim's lease (ms).
-- Returns {1, token} or {0, <what holds it>}.

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ARGV[1]} end
return {0, redis.call('GET', KEYS[1])}
